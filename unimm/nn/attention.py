"""One attention module: self- or cross-attention, MHA/GQA/MQA, RoPE, QK-norm,
with an optional explicit KV cache.

Heads: `num_heads` query heads share `num_kv_heads` key/value heads
(num_kv_heads == num_heads: MHA; 1: MQA, as Gemini; otherwise GQA).

The cache is an explicit pytree, never a mutable collection. A layer's slice
is {"k": [B, K, S, H], "v": [B, K, S, H]}, heads-major, the layout the
attention's batched matmuls read, so a decode step reads the cache as it
lies instead of transposing all S slots of every layer (a full copy per
step: on CPU at batch 16, about 2.2 of a 3.7 ms step). New keys/values
for the T input tokens are written at `cache_index` with
dynamic_update_slice and the queries attend over all S slots under the
mask the caller gives ([B, T, S]).
A layer may also get the whole stack's cache, {"k", "v" [L, B, K, S, H],
"layer": its index} (see cache_read / cache_write): it then writes only its
new tokens into it, so a decode step updates the cache in place instead of
slicing out and restacking every layer's copy.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.layers import constrain, dense, dtype_of, partitioned

CACHE_AXES = ("cache_batch", "cache_heads", "cache_len", "cache_head_dim")
NEG_INF = -1e30  # finite, so fully-masked rows give a uniform (not NaN) softmax


def cache_read(cache, name):
  """This layer's [B, K, S, H] view of cache[name] (module doc)."""
  if "layer" not in cache:
    return cache[name]
  return jax.lax.dynamic_index_in_dim(cache[name], cache["layer"], 0,
                                      keepdims=False)


def cache_write(cache, name, value, index):
  """cache[name] with value [B, T, K, H] written at slot `index` of this
  layer (module doc)."""
  zero = jnp.zeros((), jnp.int32)
  index = jnp.asarray(index, jnp.int32)
  value = value.astype(cache[name].dtype).transpose(0, 2, 1, 3)  # [B, K, T, H]
  if "layer" not in cache:
    return jax.lax.dynamic_update_slice(cache[name], value,
                                        (zero, zero, index, zero))
  layer = jnp.asarray(cache["layer"], jnp.int32)
  return jax.lax.dynamic_update_slice(cache[name], value[None],
                                      (layer, zero, zero, index, zero))


def apply_rope(x, positions, max_wavelength: float = 10_000.0):
  """Rotary position embedding (Su et al. 2021). x: [B, T, N, H]; positions [B, T]."""
  h = x.shape[-1]
  if h % 2:
    raise ValueError(f"RoPE needs an even head_dim, got {h} (config.model.head_dim).")
  fraction = 2 * jnp.arange(h // 2, dtype=jnp.float32) / h
  timescale = max_wavelength ** fraction  # [H/2]
  angles = positions[..., None].astype(jnp.float32) / timescale  # [B, T, H/2]
  sin = jnp.sin(angles)[:, :, None, :]  # [B, T, 1, H/2]
  cos = jnp.cos(angles)[:, :, None, :]
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)


def dot_product_attention(q, k, v, mask, *, bias=None, scale=None,
                          heads_major: bool = False):
  """Grouped-query attention core.

  q: [B, T, N, H]; k, v: [B, S, K, H] with N % K == 0 ([B, K, S, H] with
  heads_major, as the cache holds them); mask: bool [B, T, S]
  (True = may attend) or None. bias: additive logits [B or 1, N, T, S] (T5's
  relative position bias) or None; scale: logit scale (default 1/sqrt(H);
  T5 uses 1). Softmax in float32. Returns [B, T, N, H].
  """
  b, t, n, h = q.shape
  if not heads_major:
    k = k.transpose(0, 2, 1, 3)  # [B, K, S, H]
    v = v.transpose(0, 2, 1, 3)
  kv_heads, s = k.shape[1], k.shape[2]
  g = n // kv_heads
  # Heads-major layout with each kv head's g query heads folded into the
  # query length: [B, K, G*T, H] x [B, K, S, H]. Plain batched matmuls over
  # (B, K) and 4-D elementwise ops, which XLA:CPU runs ~2x faster (forward
  # and backward) than a 5-D grouped einsum. Scale q, not the [T, S] logits.
  scale = 1.0 / np.sqrt(h) if scale is None else scale
  if scale != 1:
    q = q * jnp.asarray(scale, q.dtype)
  q = q.reshape(b, t, kv_heads, g, h).transpose(0, 2, 3, 1, 4)
  q = q.reshape(b, kv_heads, g * t, h)
  if bias is not None:  # [B', N, T, S] -> [B', K, G*T, S]: N = (K, G)
    bias = bias.reshape(bias.shape[0], kv_heads, g * t, s)
  if mask is not None:  # [B', T, S] -> [B', 1, G*T, S]
    mask = jnp.tile(mask, (1, g, 1))[:, None]
  out = _softmax_attention(q, k, v, mask, bias)  # [B, K, G*T, H]
  out = out.reshape(b, kv_heads, g, t, h).transpose(0, 3, 1, 2, 4)
  return out.reshape(b, t, n, h)


def weighted_attention(q, k, v, weights, *, eps: float = 1e-6):
  """Attention whose probabilities are multiplied by float `weights` and
  renormalised: LaVIT's softmax_with_policy (Jin et al. 2023), a mask that
  gradients reach, so a straight-through keep decision is trained by the
  attention it gates.

  q: [B, T, N, H]; k, v: [B, S, K, H]; weights [B, T, S] in [0, 1]. A row
  whose weights are all 0 attends uniformly with a tiny total (eps), not
  NaN. Returns [B, T, N, H].
  """
  n, h = q.shape[2], q.shape[3]
  if k.shape[2] != n:  # GQA / MQA: each kv head serves n / K query heads
    k = jnp.repeat(k, n // k.shape[2], axis=2)
    v = jnp.repeat(v, n // v.shape[2], axis=2)
  logits = jnp.einsum("btnh,bsnh->bnts", q, k).astype(jnp.float32)
  logits = logits / np.sqrt(h)
  logits = logits - jax.lax.stop_gradient(
      jnp.max(logits, axis=-1, keepdims=True))
  probs = jnp.exp(logits) * weights[:, None].astype(jnp.float32)
  probs = (probs + eps / k.shape[1]) / (
      jnp.sum(probs, axis=-1, keepdims=True) + eps)
  return jnp.einsum("bnts,bsnh->btnh", probs.astype(v.dtype), v)


def _masked_logits(q, k, mask, bias):
  """float32 logits [B, K, Q, S] of the heads-major q and k, plus bias, with
  masked entries set to NEG_INF."""
  logits = jnp.einsum("bkqh,bksh->bkqs", q, k).astype(jnp.float32)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, NEG_INF)
  return logits


@jax.custom_vjp
def _softmax_attention(q, k, v, mask, bias):
  """softmax(q k^T + bias, masked) v in the heads-major layout: q [B, K, Q,
  H], k and v [B, K, S, H], mask bool and bias broadcastable to [B, K, Q, S]
  (either may be None). Returns [B, K, Q, H]."""
  return _softmax_attention_fwd(q, k, v, mask, bias)[0]


def _softmax_attention_fwd(q, k, v, mask, bias):
  logits = _masked_logits(q, k, mask, bias)
  row_max = jnp.max(logits, axis=-1, keepdims=True)
  unnormalized = jnp.exp(logits - row_max)
  row_sum = jnp.sum(unnormalized, axis=-1, keepdims=True)
  out = jnp.einsum("bkqs,bksh->bkqh", (unnormalized / row_sum).astype(
      v.dtype), v)
  # Keep the row statistics, not the [Q, S] probabilities: the backward
  # recomputes them with one matmul (FlashAttention's trade), which on CPU
  # is cheaper than stacking them per layer under nn.scan.
  return out, (q, k, v, mask, bias, out, row_max, row_sum)


def _softmax_attention_bwd(residuals, d_out):
  q, k, v, mask, bias, out, row_max, row_sum = residuals
  # The forward's probabilities, recomputed exactly.
  probs = jnp.exp(_masked_logits(q, k, mask, bias) - row_max) / row_sum
  d_v = jnp.einsum("bkqs,bkqh->bksh", probs.astype(v.dtype), d_out)
  d_probs = jnp.einsum("bkqh,bksh->bkqs", d_out, v).astype(jnp.float32)
  # Softmax backward with the row sum of p * dp taken as (d_out . out) over
  # H instead of over the S keys (FlashAttention-2, Dao 2023, eq. 4).
  row_dot = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32),
                    axis=-1, keepdims=True)
  d_logits = probs * (d_probs - row_dot)
  if mask is not None:  # masked logits were constants (fully masked rows)
    d_logits = jnp.where(mask, d_logits, 0.0)
  d_bias = None
  if bias is not None:
    summed = tuple(i for i, (n_b, n_d) in enumerate(
        zip(bias.shape, d_logits.shape)) if n_b == 1 and n_d != 1)
    d_bias = jnp.sum(d_logits, axis=summed, keepdims=True).astype(bias.dtype)
  d_logits = d_logits.astype(q.dtype)
  d_q = jnp.einsum("bkqs,bksh->bkqh", d_logits, k)
  d_k = jnp.einsum("bkqs,bkqh->bksh", d_logits, q)
  return d_q, d_k, d_v, None, d_bias


_softmax_attention.defvjp(_softmax_attention_fwd, _softmax_attention_bwd)


class Attention(nn.Module):
  """Multi-head attention with num_kv_heads for MHA/GQA/MQA."""
  num_heads: int
  num_kv_heads: int
  head_dim: int
  embed_dim: int
  use_rope: bool = False
  rope_max_wavelength: float = 10_000.0
  qk_norm: bool = False
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  deterministic: bool = True

  def setup(self):
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
          f"{self.num_kv_heads}; set config.model.num_kv_heads to a divisor.")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.query = dense((self.num_heads, self.head_dim),
                       ("embed", "heads", "head_dim"), name="query", **kw)
    self.key = dense((self.num_kv_heads, self.head_dim),
                     ("embed", "kv_heads", "head_dim"), name="key", **kw)
    self.value = dense((self.num_kv_heads, self.head_dim),
                       ("embed", "kv_heads", "head_dim"), name="value", **kw)
    self.out = dense(self.embed_dim, ("heads", "head_dim", "embed"),
                     axis=(-2, -1), name="out", **kw)
    if self.qk_norm:
      # Chameleon §2.3 / ViT-22B: normalising q and k keeps logits bounded.
      norm = lambda name: nn.RMSNorm(
          epsilon=1e-6, dtype=dtype_of(self.dtype),
          param_dtype=dtype_of(self.param_dtype),
          scale_init=partitioned(nn.initializers.ones, ("head_dim",)),
          name=name)
      self.query_norm = norm("query_norm")
      self.key_norm = norm("key_norm")
    self.dropout = nn.Dropout(self.dropout_rate)

  def project_kv(self, x, positions=None):
    """Keys and values of x [B, S, D] -> ([B, S, K, H], [B, S, K, H])."""
    k = self.key(x)
    if self.qk_norm:
      k = self.key_norm(k)
    if self.use_rope:
      k = apply_rope(k, positions, self.rope_max_wavelength)
    return k, self.value(x)

  def __call__(self, x, kv_input=None, *, mask=None, positions=None,
               kv_positions=None, cache=None, cache_index=None,
               precomputed_kv=None, heads_major=False, weights=None):
    """Attention of x [B, T, D] over itself or over `kv_input` [B, S, D].

    mask: bool [B, T, S] over the attended keys (cache slots when a cache is
    given). cache: {"k", "v"} of [B, K, S, H] (or the stack's, with
    "layer"; module doc); new keys are written at cache_index and the
    updated {"k", "v"} is returned. precomputed_kv: (k, v) to
    attend to directly (cross-attention K/V computed once by the sampler),
    [B, S, K, H], or [B, K, S, H] with heads_major (read from a cache).
    weights: float [B, T, S] in place of `mask` (weighted_attention).
    Returns (out [B, T, D], new_cache or None).
    """
    q = self.query(x)  # [B, T, N, H]
    if self.qk_norm:
      q = self.query_norm(q)
    if self.use_rope:
      q = apply_rope(q, positions, self.rope_max_wavelength)
    q = constrain(q, ("act_batch", "act_len", "act_heads", None))

    new_cache = None
    if precomputed_kv is not None:
      k, v = precomputed_kv
    else:
      source = x if kv_input is None else kv_input
      source_positions = positions if kv_input is None else kv_positions
      k, v = self.project_kv(source, source_positions)  # [B, S, K, H]
      if cache is not None:
        new_cache = {"k": cache_write(cache, "k", k, cache_index),
                     "v": cache_write(cache, "v", v, cache_index)}
        view = {**cache, **new_cache}  # keeps "layer" when given
        k = constrain(cache_read(view, "k"), CACHE_AXES)
        v = constrain(cache_read(view, "v"), CACHE_AXES)
        heads_major = True
    if weights is not None:
      if heads_major:
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
      out = weighted_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                               weights)
    else:
      out = dot_product_attention(q, k.astype(q.dtype), v.astype(q.dtype),
                                  mask, heads_major=heads_major)
    out = self.dropout(out, deterministic=self.deterministic)
    return self.out(out), new_cache  # [B, T, D]
