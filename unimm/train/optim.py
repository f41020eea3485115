"""The default optimizer: AdamW, linear warm-up + cosine decay, clipping.

Built from config.optimizer (lr, warmup_steps, end_lr_fraction, b1, b2, eps,
weight_decay, grad_clip_norm) and config.total_steps. Weight decay skips
1-D parameters (biases, norm scales), as in BERT/GPT-2 and big_vision.
"""
from typing import Any, Mapping

import jax
import optax


def _check(opt_config: Mapping[str, Any], total_steps: int) -> None:
  if total_steps <= 0:
    raise ValueError(f"config.total_steps={total_steps} must be positive.")
  lr = opt_config["lr"]
  if not lr > 0:
    raise ValueError(f"config.optimizer.lr={lr} must be positive.")
  warmup = opt_config["warmup_steps"]
  if not 0 <= warmup <= total_steps:
    raise ValueError(
        f"config.optimizer.warmup_steps={warmup} must lie in [0, "
        f"config.total_steps={total_steps}].")
  end = opt_config.get("end_lr_fraction", 0.0)
  if not 0 <= end <= 1:
    raise ValueError(
        f"config.optimizer.end_lr_fraction={end} must lie in [0, 1].")
  for name in ("b1", "b2"):
    value = opt_config.get(name, 0.9)
    if not 0 <= value < 1:
      raise ValueError(f"config.optimizer.{name}={value} must lie in [0, 1).")
  for name in ("weight_decay", "grad_clip_norm"):
    value = opt_config.get(name, 0.0)
    if value < 0:
      raise ValueError(f"config.optimizer.{name}={value} must be >= 0 "
                       "(0 turns it off).")


def learning_rate_schedule(opt_config: Mapping[str, Any], total_steps: int
                           ) -> optax.Schedule:
  """Linear warm-up from 0 to lr, then cosine decay to lr * end_lr_fraction."""
  _check(opt_config, total_steps)
  lr = float(opt_config["lr"])
  warmup = int(opt_config["warmup_steps"])
  end_value = lr * float(opt_config.get("end_lr_fraction", 0.0))
  if warmup >= total_steps:  # Warm-up only.
    return optax.linear_schedule(0.0, lr, max(warmup, 1))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=total_steps, end_value=end_value)


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything but 1-D ones."""
  return jax.tree.map(lambda p: p.ndim > 1, params)


def make_optimizer(opt_config: Mapping[str, Any], total_steps: int
                   ) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW on the warm-up/cosine schedule."""
  schedule = learning_rate_schedule(opt_config, total_steps)
  parts = []
  clip = float(opt_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  parts.append(optax.adamw(
      learning_rate=schedule,
      b1=float(opt_config.get("b1", 0.9)),
      b2=float(opt_config.get("b2", 0.999)),
      eps=float(opt_config.get("eps", 1e-8)),
      weight_decay=float(opt_config.get("weight_decay", 0.0)),
      mask=decay_mask))
  return optax.chain(*parts)
