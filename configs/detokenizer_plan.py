"""The diffusion de-tokenizer at DiT-XL's size, for the AOT planner.

  python -m unimm.plan --config configs/detokenizer_plan.py --mesh fsdp=8

The decoder SEED-X / NExT-GPT-style models draw images with, at the paper
row of unimm.models.diffusion.SIZES (DiT-XL's width 1152, 28 layers and 16
heads; 0.60B parameters with cross-attention to the condition where
DiT-XL/2's adaLN-Zero has 675M), on 256x256 pixels in 16x16 patches: 256 tokens,
as DiT-XL/2 on a 32x32 latent, and the pixel-space patch of Li & He 2025
(JiT), whose x-prediction the decoder uses. It is conditioned on the code
vectors of a frozen ViT-VQGAN (configs/vit_vqgan_plan.py's size, 32x32
codes), trained by flow matching, in bfloat16 with scanned, rematerialized
layers. No tokenizer workdir is read: the planner builds the frozen
tokenizer from config.tokenizer_model and traces its parameters with the
init (to train, use configs/detokenizer_shapes.py's tokenizer_workdir).

Variants (arg "key=value,..."): size (unimm.models.diffusion.SIZES), patch
(pixels per patch side), tokenizer (the ViT-VQGAN's size: tiny | small |
base | large), condition (codes | encoder), batch (global), remat, dtype.

Expected (docs/results.md, docs/scaling.md): on fsdp=8 at global batch
256, 7.9 GiB per chip (fits v4, v5p and v5e) and XLA's FLOPs 1.015x the
analytic count; at batch 1 per chip (--table) one v5e chip holds it.
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.diffusion import diffusion_config
from unimm.tokenizers.vit_vqgan import vit_vqgan_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="paper", patch=16, tokenizer="base", condition="codes",
      batch=256, remat="full", dtype="bfloat16")
  config = config_lib.base_config("detokenizer", total_steps=400_000)
  config.tokenizer_workdir = ""
  config.tokenizer_model = ml_collections.ConfigDict(vit_vqgan_config(
      arg.tokenizer, scan_layers=True, dtype=arg.dtype,
      param_dtype=arg.dtype))
  config.condition = arg.condition
  config.model = ml_collections.ConfigDict(diffusion_config(
      arg.size, patch_size=arg.patch, scan_layers=True,
      remat_policy=arg.remat, dtype=arg.dtype, param_dtype=arg.dtype))
  config.loss = ml_collections.ConfigDict(dict(condition_drop_rate=0.1,
                                               target="x"))
  # DiT (Peebles & Xie 2023, §4): AdamW at a constant 1e-4, no decay.
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=1e-4, warmup_steps=0, end_lr_fraction=1.0, b1=0.9, b2=0.999,
      eps=1e-8, weight_decay=0.0, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(
      source="", batch_size=arg.batch, data_dir=None, worker_count=0))
  config.eval = ml_collections.ConfigDict(dict(
      split="test", num_images=256, batch_size=64, num_steps=32,
      cfg_scale=None, probe_prompts=0))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
