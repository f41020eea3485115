"""Small shared building blocks: dense layers, norms, MLP, positions, patches.

Every parameter carries logical axis names (nn.with_logical_partitioning); the
logical -> mesh rules live in the config (see unimm/parallel.py).
"""
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = str  # "float32" | "bfloat16" | ...; strings keep configs JSON-friendly.
ACTIVATION_AXES = ("act_batch", "act_len", "act_embed")


def partitioned(init, axes: Sequence[str | None]):
  """An initializer whose parameter carries logical axis names."""
  return nn.with_logical_partitioning(init, tuple(axes))


def constrain(x, axes: Sequence[str | None] = ACTIVATION_AXES):
  """Activation sharding constraint by logical names (no-op without rules)."""
  return nn.with_logical_constraint(x, tuple(axes))


class Linear(nn.Module):
  """y = x . W (+ b), contracting `axis` of x with W's leading axes.

  Like nn.DenseGeneral, but the kernel is created in its full shape
  (contracted axes + feature axes), so its logical names always match its
  rank (DenseGeneral initialises a flattened 2-D kernel and reshapes it).
  """
  features: tuple[int, ...]
  logical_axes: tuple[str | None, ...]
  axis: tuple[int, ...] = (-1,)
  use_bias: bool = False
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  kernel_init: Any = None

  @nn.compact
  def __call__(self, x):
    axis = tuple(a % x.ndim for a in self.axis)
    in_shape = tuple(x.shape[a] for a in axis)
    n_in, n_out = len(in_shape), len(self.features)
    init = self.kernel_init or nn.initializers.variance_scaling(
        1.0, "fan_in", "truncated_normal", in_axis=tuple(range(n_in)),
        out_axis=tuple(range(n_in, n_in + n_out)))
    kernel = self.param("kernel", partitioned(init, self.logical_axes),
                        in_shape + tuple(self.features),
                        jnp.dtype(self.param_dtype))
    dtype = jnp.dtype(self.dtype)
    y = jax.lax.dot_general(
        x.astype(dtype), kernel.astype(dtype),
        ((axis, tuple(range(n_in))), ((), ())))
    if self.use_bias:
      bias = self.param("bias", partitioned(nn.initializers.zeros,
                                            self.logical_axes[n_in:]),
                        tuple(self.features), jnp.dtype(self.param_dtype))
      y = y + bias.astype(dtype)
    return y


def dense(features, logical_axes, *, axis=-1, use_bias=False, dtype="float32",
          param_dtype="float32", kernel_init=None, name=None):
  """A Linear layer whose kernel (and bias) have logical axis names.

  `logical_axes` names every kernel axis: the contracted input axes followed
  by the output feature axes, e.g. ("embed", "heads", "head_dim").
  """
  features = tuple(features) if isinstance(features, (tuple, list)) else (
      features,)
  axis = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
  if len(logical_axes) != len(axis) + len(features):
    raise ValueError(f"logical_axes {logical_axes} must name {len(axis)} "
                     f"input and {len(features)} output axes.")
  return Linear(features=features, logical_axes=tuple(logical_axes),
                axis=axis, use_bias=use_bias, dtype=dtype,
                param_dtype=param_dtype, kernel_init=kernel_init, name=name)


def norm_layer(kind: str, *, dtype="float32", param_dtype="float32",
               name=None):
  """Pre-norm layer: 'layernorm' or 'rmsnorm'; scale (and bias) on 'norm'."""
  if kind == "layernorm":
    return nn.LayerNorm(
        epsilon=1e-6, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
        scale_init=partitioned(nn.initializers.ones, ("norm",)),
        bias_init=partitioned(nn.initializers.zeros, ("norm",)), name=name)
  if kind == "rmsnorm":
    return nn.RMSNorm(
        epsilon=1e-6, dtype=jnp.dtype(dtype), param_dtype=jnp.dtype(param_dtype),
        scale_init=partitioned(nn.initializers.ones, ("norm",)), name=name)
  raise ValueError(
      f"Unknown norm {kind!r}; expected 'layernorm' or 'rmsnorm' "
      "(set config.model.norm).")


CONV_AXES = (None, None, "conv_in", "conv_out")  # [kh, kw, C_in, C_out]


def conv(features: int, kernel: int, name: str, *, dtype: Dtype = "float32",
         param_dtype: Dtype = "float32", strides: int = 1,
         padding: str = "SAME", use_bias: bool = True, kernel_init=None):
  """A square nn.Conv whose kernel and bias carry logical axis names."""
  return nn.Conv(features, (kernel, kernel), strides=(strides, strides),
                 padding=padding, use_bias=use_bias, dtype=jnp.dtype(dtype),
                 param_dtype=jnp.dtype(param_dtype),
                 kernel_init=partitioned(
                     kernel_init or nn.initializers.lecun_normal(), CONV_AXES),
                 bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
                 name=name)


class Mlp(nn.Module):
  """Feed-forward block: 'gelu' (ViT/T5 style) or gated 'swiglu'/'geglu'."""
  embed_dim: int
  mlp_dim: int
  activation: str = "gelu"
  dropout_rate: float = 0.0
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  deterministic: bool = True

  @nn.compact
  def __call__(self, x):  # x: [B, T, D]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.activation in ("swiglu", "geglu"):
      act = nn.silu if self.activation == "swiglu" else nn.gelu
      gate = dense(self.mlp_dim, ("embed", "mlp"), name="wi_gate", **kw)(x)
      up = dense(self.mlp_dim, ("embed", "mlp"), name="wi_up", **kw)(x)
      h = act(gate) * up  # [B, T, F]
    elif self.activation in ("gelu", "relu"):
      act = nn.gelu if self.activation == "gelu" else nn.relu
      h = act(dense(self.mlp_dim, ("embed", "mlp"), use_bias=True, name="wi",
                    **kw)(x))
    else:
      raise ValueError(
          f"Unknown mlp_activation {self.activation!r}; expected one of "
          "'gelu', 'relu', 'swiglu', 'geglu' (set config.model.mlp_activation).")
    h = constrain(h, ("act_batch", "act_len", "act_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=self.deterministic)
    return dense(self.embed_dim, ("mlp", "embed"),
                 use_bias=self.activation in ("gelu", "relu"), name="wo",
                 **kw)(h)


class LearnedPositions(nn.Module):
  """Adds a learned position embedding: x [B, T, D] -> x + pos[:T]."""
  max_len: int
  embed_dim: int
  param_dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, x, positions=None):
    table = self.param(
        "pos_embedding",
        partitioned(nn.initializers.normal(0.02), (None, "embed")),
        (self.max_len, self.embed_dim), jnp.dtype(self.param_dtype))
    if positions is None:
      pos = table[None, :x.shape[1]]  # [1, T, D]
    else:
      pos = jnp.take(table, positions, axis=0)  # [B, T, D]
    return x + pos.astype(x.dtype)


def sincos_positions_2d(height: int, width: int, dim: int):
  """Fixed 2-D sine-cosine position table [h*w, dim] (MAE / big_vision)."""
  if dim % 4:
    raise ValueError(f"2-D sincos positions need embed_dim % 4 == 0, got {dim}.")
  y, x = jnp.mgrid[:height, :width]
  omega = 1.0 / (10_000 ** (jnp.arange(dim // 4) / (dim // 4 - 1 or 1)))
  y = y.reshape(-1)[:, None] * omega[None]
  x = x.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(x), jnp.cos(x), jnp.sin(y), jnp.cos(y)], 1)


class PatchEmbed(nn.Module):
  """Images [B, H, W, C] -> patch tokens [B, (H/p)*(W/p), D] (ViT §3.1)."""
  patch_size: int
  embed_dim: int
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, images):
    b, h, w, c = images.shape
    p = self.patch_size
    if h % p or w % p:
      raise ValueError(
          f"patch_size {p} does not divide the image size {h}x{w}; set "
          "config.model.patch_size to a divisor of the image size.")
    x = images.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, (h // p) * (w // p), p * p * c)
    x = x.astype(jnp.dtype(self.dtype))
    return dense(self.embed_dim, ("patch", "embed"), use_bias=True,
                 dtype=self.dtype, param_dtype=self.param_dtype,
                 name="proj")(x)  # [B, h*w, D]


class PatchUnembed(nn.Module):
  """Patch tokens [B, h*w, D] -> images [B, h*p, w*p, C] (linear per patch)."""
  patch_size: int
  out_channels: int
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"

  @nn.compact
  def __call__(self, x, grid: tuple[int, int]):
    b, t, _ = x.shape
    h, w = grid
    if h * w != t:
      raise ValueError(f"grid {grid} does not match {t} tokens.")
    p, c = self.patch_size, self.out_channels
    x = dense(p * p * c, ("embed", "patch"), use_bias=True, dtype=self.dtype,
              param_dtype=self.param_dtype, name="proj")(x)  # [B, T, p*p*C]
    x = x.reshape(b, h, w, p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, h * p, w * p, c)


def embed_init(stddev: float = 1.0):
  return nn.initializers.normal(stddev)


class Embedder(nn.Module):
  """Token embedding with an optional tied read-out (logits = x @ E^T).

  Inputs are scaled by sqrt(embed_dim). A tied read-out wants stddev =
  embed_dim ** -0.5 (Gemma-like: unit-scale inputs and logits of unit scale
  at init); stddev 1 suits an embedding used only for input.
  """
  vocab_size: int
  embed_dim: int
  dtype: Dtype = "float32"
  param_dtype: Dtype = "float32"
  stddev: float = 1.0

  def setup(self):
    self.embedding = self.param(
        "embedding", partitioned(embed_init(self.stddev), ("vocab", "embed")),
        (self.vocab_size, self.embed_dim), jnp.dtype(self.param_dtype))

  def encode(self, ids):  # ids: [B, T] -> [B, T, D]
    x = jnp.take(self.embedding, ids, axis=0).astype(jnp.dtype(self.dtype))
    return x * jnp.sqrt(self.embed_dim).astype(x.dtype)

  def decode(self, x):  # x: [B, T, D] -> logits [B, T, V]
    return jnp.einsum("btd,vd->btv", x, self.embedding.astype(x.dtype))

  def __call__(self, ids):
    return self.encode(ids)


def dtype_of(name: str):
  try:
    return jnp.dtype(name)
  except TypeError as e:
    raise ValueError(f"Unknown dtype {name!r} (config.model.dtype).") from e


__all__ = ["partitioned", "constrain", "dense", "norm_layer", "Mlp",
           "LearnedPositions", "sincos_positions_2d", "PatchEmbed",
           "PatchUnembed", "Embedder", "dtype_of"]
