"""The default optimizer: AdamW or Muon, warm-up + cosine decay, clipping.

Built from config.optimizer (name, lr, warmup_steps, end_lr_fraction, b1,
b2, eps, weight_decay, grad_clip_norm; for Muon also muon_beta and
muon_rms) and config.total_steps. Weight decay skips 1-D parameters
(biases, norm scales), as in BERT/GPT-2 and big_vision.

lr_scales ({module name: factor}, optional): the updates of every
parameter under a module of that name are multiplied by the factor, i.e.
that part of the model trains at factor x the schedule's learning rate
(weight decay included), e.g. {"selector": 0.1} for LaVIT's token
selector. A name that matches no parameter is an error.

name "muon" (Jordan et al. 2024; optax.contrib.muon): the hidden layers'
matrices -- attention and MLP kernels, found by their logical axis names
(muon_dimension_numbers) -- step along their orthogonalised momentum
(Newton-Schulz), scaled to AdamW's update RMS (muon_rms 0.2, as Moonlight
does, so the same lr serves both halves); embeddings, the output layer,
position tables, norms and biases keep AdamW. In optax's Muon the AdamW
half decays every parameter it holds (1-D ones too) and uses Nesterov
momentum. Measured on the demo's Parti (README, "Optimizer").
"""
from typing import Any, Mapping

import jax
import optax
from optax import contrib

OPTIMIZERS = ("adamw", "muon")
# Axes of a hidden layer's matrix: the residual stream ("embed") on one side,
# the layer's own width on the other. "layers" (nn.scan) is a batch axis.
_HIDDEN_AXES = ("embed", "mlp", "heads", "kv_heads", "head_dim")


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
  optimizer = opt_config.get("name", "adamw")
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={optimizer!r}; expected one of "
                     f"{OPTIMIZERS}.")
  for name in ("weight_decay", "grad_clip_norm"):
    value = opt_config.get(name, 0.0)
    if value < 0:
      raise ValueError(f"config.optimizer.{name}={value} must be >= 0 "
                       "(0 turns it off).")
  for name, factor in dict(opt_config.get("lr_scales") or {}).items():
    if not isinstance(name, str) or not name or not (
        isinstance(factor, (int, float)) and factor > 0):
      raise ValueError(
          f"config.optimizer.lr_scales has {name!r}: {factor!r}; expected a "
          "module name and a positive factor, e.g. {'selector': 0.1}.")


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


def _key(entry) -> str:
  return str(getattr(entry, "key", getattr(entry, "name", "")))


def _is_frozen(path) -> bool:
  return any(_key(k).startswith("frozen") for k in path)


def frozen_mask(params: Any, is_leaf=None) -> Any:
  """True for frozen parameters: a name starting with "frozen" (e.g. the
  interleaved model's frozen_image_table). Models read them through
  stop_gradient, so with no weight decay their updates are exactly zero."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _is_frozen(path), params, is_leaf=is_leaf)


def module_mask(name: str, is_leaf=None):
  """mask(params) -> True for the parameters under a module called `name`
  (a path entry equal to it); a ValueError when none is."""
  def mask(params):
    out = jax.tree_util.tree_map_with_path(
        lambda path, _: any(_key(k) == name for k in path), params,
        is_leaf=is_leaf)
    if not any(jax.tree.leaves(out)):
      raise ValueError(
          f"config.optimizer.lr_scales names {name!r}, but no parameter sits "
          "under a module of that name; use a name from the model's "
          "parameter tree (e.g. 'selector').")
    return out
  return mask


def _scaled(parts: list, opt_config: Mapping[str, Any]) -> list:
  """parts + a masked scale per config.optimizer.lr_scales entry."""
  for name, factor in sorted(dict(opt_config.get("lr_scales") or {}).items()):
    parts.append(optax.masked(optax.scale(float(factor)), module_mask(name)))
  return parts


def decay_mask(params: Any) -> Any:
  """True for parameters that get weight decay: everything but 1-D ones
  and frozen ones (frozen_mask)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim > 1 and not _is_frozen(path), params)


def muon_dimension_numbers(names: Any) -> contrib.MuonDimensionNumbers | None:
  """How Muon treats a parameter with these logical axis names, or None
  (AdamW).

  A hidden layer's kernel has only _HIDDEN_AXES (besides "layers") with
  "embed" first (it reads the residual stream: q/k/v, MLP in) or last (it
  writes it: attention out, MLP out); the other axes form the matrix's
  other side. Anything else -- a "vocab" axis (embeddings, output layer),
  an unnamed axis (position tables), patch projections, 1-D parameters --
  is None.
  """
  names = tuple(names or ())
  matrix = [i for i, n in enumerate(names) if n != "layers"]
  if len(matrix) < 2 or any(names[i] not in _HIDDEN_AXES for i in matrix):
    return None
  if names[matrix[0]] == "embed":
    return contrib.MuonDimensionNumbers(matrix[0], tuple(matrix[1:]))
  if names[matrix[-1]] == "embed":
    return contrib.MuonDimensionNumbers(tuple(matrix[:-1]), matrix[-1])
  return None


def make_optimizer(opt_config: Mapping[str, Any], total_steps: int,
                   param_names: Any = None) -> optax.GradientTransformation:
  """Global-norm clipping followed by AdamW (or Muon) on the warm-up/cosine
  schedule.

  param_names: the parameters' logical PartitionSpecs (unimm.parallel.
  logical_specs of the boxed params), which Muon needs to find the hidden
  matrices; unused by AdamW.
  """
  schedule = learning_rate_schedule(opt_config, total_steps)
  parts = []
  clip = float(opt_config.get("grad_clip_norm", 0.0))
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  weight_decay = float(opt_config.get("weight_decay", 0.0))
  if opt_config.get("name", "adamw") == "muon":
    if param_names is None:
      raise ValueError("config.optimizer.name='muon' needs the parameters' "
                       "logical axis names (make_optimizer's param_names).")
    is_spec = lambda x: isinstance(x, jax.sharding.PartitionSpec)  # noqa: E731
    dimension_numbers = jax.tree.map(muon_dimension_numbers, param_names,
                                     is_leaf=is_spec)
    if not any(d is not None for d in jax.tree.leaves(
        dimension_numbers, is_leaf=lambda x: x is None)):
      raise ValueError(
          "config.optimizer.name='muon' found no hidden-layer matrix among "
          "the parameters (kernels named with 'embed' and 'mlp' / 'heads' / "
          "'head_dim'); use name='adamw'.")
    parts.append(contrib.muon(
        learning_rate=schedule,
        beta=float(opt_config.get("muon_beta", 0.95)),
        eps=float(opt_config.get("eps", 1e-8)),
        weight_decay=weight_decay, weight_decay_mask=decay_mask,
        consistent_rms=float(opt_config.get("muon_rms", 0.2)),
        adam_b1=float(opt_config.get("b1", 0.9)),
        adam_b2=float(opt_config.get("b2", 0.999)),
        adam_weight_decay=weight_decay,
        muon_weight_dimension_numbers=lambda _: dimension_numbers))
    if any(jax.tree.leaves(frozen_mask(param_names, is_leaf=is_spec))):
      # optax's Muon decays every parameter of its AdamW half: zero the
      # frozen ones' updates after it.
      parts.append(optax.masked(optax.set_to_zero(), frozen_mask))
    return optax.chain(*_scaled(parts, opt_config))
  parts.append(optax.adamw(
      learning_rate=schedule,
      b1=float(opt_config.get("b1", 0.9)),
      b2=float(opt_config.get("b2", 0.999)),
      eps=float(opt_config.get("eps", 1e-8)),
      weight_decay=weight_decay,
      mask=decay_mask))
  return optax.chain(*_scaled(parts, opt_config))
