"""A diffusion de-tokenizer on shapes: the frozen ViT-VQGAN's codes ->
32x32 images by a small DiT trained with flow matching.

  python -m unimm.main --config configs/detokenizer_shapes.py \\
      --workdir workdirs/detok

Needs a trained tokenizer (config arg tokenizer_workdir, default
workdirs/tok_16k: `python -m unimm.main --config
configs/vit_vqgan_shapes.py:steps=16000 --workdir workdirs/tok_16k`). The
decoder reads the code vectors of the tokenizer's ids (condition=codes) or
its encoder's continuous tokens (condition=encoder), unimm.train.
detokenizer_task; --mode eval decodes held-out (test split) images by
both the tokenizer's decoder and the diffusion decoder and reports psnr /
tokenizer_psnr and, on the fixed prompt set, the shapes probe's reading of
both (reconstructed_prompt_accuracy_single / _pair, tokenizer_...), and
writes eval/reconstructions.png (truth | ViT-VQGAN | diffusion).

Expected on 2 CPU cores (docs/diffusion.md): 3,000 steps in about 5 min,
held-out PSNR 28.0 dB (the ViT-VQGAN decoder on the same ids: 36.0 dB), the
probe reading its reconstructions at 0.59 / 0.36 (one / two objects;
the ViT-VQGAN decoder's: 0.92 / 0.81); steps=10000 in 14 min: 31.7 dB,
0.93 / 0.65. steps=10000,source=1 (the editing decoder, on held-out edit
pairs): 32.3 dB with the source and 31.9 dB without, the probe reading
the edited images at 0.87 / 0.81.

Variants (arg "key=value,..."): size (unimm.models.diffusion.SIZES: tiny |
small | paper = DiT-XL/2), patch (pixels per patch side), steps, batch, lr,
tokenizer_workdir, condition (codes | encoder), drop (the rate of
examples trained with the null condition, for guidance), target (x | v:
the loss on the clean-image estimate or on the velocity,
unimm.models.diffusion.flow_matching_loss), sample_steps
(Euler steps of the eval), cfg (the eval's guidance scale; 1 = none),
probe (fixed prompts the probe reads, one- and two-object each; 0 = off),
source (1: SEED-X's editing decoder, trained on edit pairs with the image
before the edit as a second input, dropped at rate source_drop;
unimm.train.detokenizer_task).
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.diffusion import diffusion_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="tiny", patch=4, steps=3000, batch=32, lr=1e-3,
      tokenizer_workdir="workdirs/tok_16k", condition="codes", drop=0.1,
      target="x",
      sample_steps=32, cfg=1.0, probe=100, source=0, source_drop=0.2)
  config = config_lib.base_config("detokenizer", arg.steps)
  config.tokenizer_workdir = arg.tokenizer_workdir
  config.condition = arg.condition
  config.model = ml_collections.ConfigDict(diffusion_config(
      arg.size, patch_size=arg.patch, source_image=bool(arg.source)))
  config.loss = ml_collections.ConfigDict(dict(
      condition_drop_rate=float(arg.drop),
      source_drop_rate=float(arg.source_drop), target=arg.target))
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=arg.lr, warmup_steps=min(200, arg.steps // 10), end_lr_fraction=0.05,
      b1=0.9, b2=0.99, eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      source="shapes", batch_size=arg.batch, data_dir=None, worker_count=0))
  config.eval = ml_collections.ConfigDict(dict(
      split="test", num_images=256, batch_size=64,
      num_steps=int(arg.sample_steps),
      cfg_scale=None if float(arg.cfg) == 1.0 else float(arg.cfg),
      probe_prompts=int(arg.probe)))
  config.log_every_steps = 50
  config.checkpoint_every_steps = 500
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
