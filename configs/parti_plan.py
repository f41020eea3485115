"""Parti at the paper's sizes, for the AOT planner (no data or files needed).

  python -m unimm.plan --config configs/parti_plan.py:size=20b --mesh fsdp=256
  python -m unimm.plan --config configs/parti_plan.py:size=tiny,batch=8 \\
      --mesh data=2,fsdp=4

Variants (arg "key=value,..."): size (a row of unimm.models.parti.SIZES:
tiny | tiny_deep | small | 350m | 750m | 3b | 20b), batch (global examples
per step), remat (none | full | dots | dots_no_batch), dtype (parameters and
activations; bfloat16 as on TPU pods), text_vocab, codes, grid, text_length.

The shapes follow Parti §2-4: text length 128, a 32x32 grid of ViT-VQGAN
tokens over 8192 codes, SentencePiece vocabulary 16k. As a pod run would:
bf16 parameters and activations (Adam moments follow the parameter dtype),
remat "full" (only each block's input is kept for the backward pass) and
layers under nn.scan. The batch is the global batch of one step; the paper
trains with 8192, split into micro-batches when it does not fit.

Expected (docs/results.md): size=20b on fsdp=256 plans at 4.34 GiB per
chip, XLA's FLOPs 1.001x the analytic count; docs/scaling.md lists the
smallest TPU slice per size.
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.parti import parti_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="20b", batch=256, remat="full", dtype="bfloat16",
      text_vocab=16384, codes=8192, grid=32, text_length=128)
  config = config_lib.base_config("parti", total_steps=450_000)
  config.cfg_dropout = 0.1
  config.model = ml_collections.ConfigDict(parti_config(
      arg.size, text_vocab_size=arg.text_vocab, image_vocab_size=arg.codes,
      text_length=arg.text_length, image_length=arg.grid * arg.grid,
      positions="learned", scan_layers=True, remat_policy=arg.remat,
      dtype=arg.dtype, param_dtype=arg.dtype))
  # Parti §4.1: Adafactor-like settings on AdamW (lr 4.5e-4, beta2 0.96,
  # decoupled weight decay 0.045), 5000 warm-up steps.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=4.5e-4, warmup_steps=5000, end_lr_fraction=0.05,
      b1=0.9, b2=0.96, eps=1e-8, weight_decay=0.045, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(batch_size=arg.batch))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
