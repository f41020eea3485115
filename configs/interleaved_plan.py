"""The interleaved decoder-only model at 1B / 7B, for the AOT planner.

  python -m unimm.plan --config configs/interleaved_plan.py:size=7b \\
      --mesh fsdp=64

Variants (arg "key=value,..."): size (a row of unimm.models.interleaved.
SIZES: tiny | small | 1b | 7b), batch (global rows per step), length
(tokens per packed row), text_vocab, codes, grid, remat, dtype.

Shapes as a Chameleon-like run would use them: a 65,536-piece text
vocabulary and 8,192 image codes (a 32x32 grid, 1,024 tokens per image),
rows of 4,096 tokens, multi-query attention, QK-norm, bf16 parameters and
activations, remat "full" and scanned layers.

Expected (docs/results.md): size=7b on fsdp=64 with batch 256 plans at
46.0 GiB per chip, XLA's FLOPs 1.002x the analytic count; docs/scaling.md
lists the smallest TPU slice per size.
"""
import ml_collections

from unimm import config_lib
from unimm import parallel
from unimm.models.interleaved import interleaved_config


def get_config(arg=None):
  arg = config_lib.parse_arg(
      arg, size="7b", batch=256, length=4096, text_vocab=65536, codes=8192,
      grid=32, remat="full", dtype="bfloat16")
  config = config_lib.base_config("interleaved", total_steps=250_000)
  config.vocab = ml_collections.ConfigDict(dict(
      text_vocab_size=arg.text_vocab, image_vocab_size=arg.codes))
  config.model = ml_collections.ConfigDict(interleaved_config(
      arg.size, vocab_size=5 + arg.text_vocab + arg.codes, max_len=arg.length,
      image_length=arg.grid * arg.grid, image_positions="2d", qk_norm=True,
      scan_layers=True, remat_policy=arg.remat, dtype=arg.dtype,
      param_dtype=arg.dtype))
  config.loss = ml_collections.ConfigDict(dict(text_weight=1.0,
                                               image_weight=1.0))
  # Chameleon §3.1: AdamW, beta2 0.95, eps 1e-5, weight decay 0.1, clip 1.
  config.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-4, warmup_steps=4000, end_lr_fraction=0.1,
      b1=0.9, b2=0.95, eps=1e-5, weight_decay=0.1, grad_clip_norm=1.0))
  config.data = ml_collections.ConfigDict(dict(batch_size=arg.batch))
  config.mesh = ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))
  config.logical_axis_rules = parallel.STANDARD_RULES
  return config
