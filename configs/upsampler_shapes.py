"""Parti's super-resolution stage on shapes: 32x32 tokens -> 128x128 (or 64).

  python -m unimm.main --config configs/upsampler_shapes.py \\
      --workdir workdirs/upsampler_x4
  --config configs/upsampler_shapes.py:factor=2   (32 -> 64)

Needs a trained tokenizer (config arg tokenizer_workdir, default
workdirs/tokenizer: `python -m unimm.main --config
configs/vit_vqgan_shapes.py --workdir workdirs/tokenizer`). Pairs are exact:
each training scene is rendered again at 32 * factor (unimm.train.
upsampler_task). --mode eval reports PSNR against the true render of
held-out (test split) scenes, for the upsampler and for bicubic upsampling
of the same decoded image, and writes eval/comparison.png.

Expected (tiny, 1,500 steps; docs/results.md): PSNR 31.20 dB against
bicubic's 27.87 dB, +3.33 dB (target >= 3 dB).

Variants (arg "key=value,..."): factor (2 | 4), size (a row of
unimm.tokenizers.upsampler.SIZES: tiny | small | paper_x2 | paper_x4; the
paper rows are Parti's 256 -> 512 / 1024 modules), steps, batch, lr,
tokenizer_workdir, codes (1 = condition on the code vectors too, 0 = only
on the decoded image).
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.tokenizers.upsampler import upsampler_config


def get_config(arg=None):
  arg = config_lib.parse_arg(arg, factor=4, size="tiny", steps=1500, batch=16,
                             lr=2e-3, tokenizer_workdir="workdirs/tokenizer",
                             codes=1)
  config = config_lib.base_config("upsampler", arg.steps)
  config.tokenizer_workdir = arg.tokenizer_workdir
  config.model = ml_collections.ConfigDict(upsampler_config(
      arg.size, arg.factor, use_codes=bool(arg.codes)))
  config.loss = ml_collections.ConfigDict(dict(
      l2_weight=1.0, logit_laplace_weight=0.0, perceptual_weight=0.0,
      perceptual_weights=""))
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=arg.lr, warmup_steps=min(100, arg.steps // 10), end_lr_fraction=0.05,
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      source="shapes", batch_size=arg.batch, data_dir=None, worker_count=0))
  config.eval = ml_collections.ConfigDict(dict(
      split="test", num_images=512, batch_size=64))
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
