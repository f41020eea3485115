"""The one transformer stack: encoder, causal decoder or decoder with
cross-attention, chosen by flags. Pre-norm blocks; layers under nn.scan (one
compiled block, parameters stacked on a 'layers' axis) with a remat policy.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.nn.attention import Attention, cache_read, cache_write
from unimm.nn.layers import Mlp, constrain, norm_layer

REMAT_POLICIES = {
    "none": None,
    "full": "full",  # save nothing, recompute the whole block
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block, remat_policy: str, *, prevent_cse: bool = True):
  """`block` (a Module class) rematerialized by REMAT_POLICIES[remat_policy]
  ("none": itself); ValueError for an unknown policy."""
  if remat_policy not in REMAT_POLICIES:
    raise ValueError(
        f"Unknown remat_policy {remat_policy!r}; expected one of "
        f"{sorted(REMAT_POLICIES)} (set config.model.remat_policy).")
  policy = REMAT_POLICIES[remat_policy]
  if policy is None:
    return block
  return nn.remat(block, prevent_cse=prevent_cse,
                  policy=None if policy == "full" else policy)


class TransformerBlock(nn.Module):
  """x + SelfAttn(norm x) [+ CrossAttn(norm x, encoded)] + Mlp(norm x)."""
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  cross_attention: bool = False
  use_rope: bool = False
  qk_norm: bool = False
  mlp_activation: str = "gelu"
  norm: str = "layernorm"
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  deterministic: bool = True

  @nn.compact
  def __call__(self, x, layer_cache, mask, positions, encoded, cross_mask,
               cache_index):
    """x: [B, T, D]; layer_cache: this layer's cache slice, or the stack's
    cache with "layer" (attention.cache_read), or None.

    Returns (x, the updated cache without "layer"), an nn.scan body.
    """
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn_kw = dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
                   head_dim=self.head_dim, embed_dim=self.embed_dim,
                   qk_norm=self.qk_norm, dropout_rate=self.dropout_rate,
                   deterministic=self.deterministic, **kw)
    dropout = nn.Dropout(self.dropout_rate)
    new_cache = {}

    h = norm_layer(self.norm, name="pre_attention_norm", **kw)(x)
    self_cache = None
    if layer_cache is not None:
      self_cache = {k: v for k, v in layer_cache.items()
                    if k in ("k", "v", "layer")}
    h, updated = Attention(use_rope=self.use_rope, name="self_attention",
                           **attn_kw)(h, mask=mask, positions=positions,
                                      cache=self_cache,
                                      cache_index=cache_index)
    if updated is not None:
      new_cache.update(updated)
    x = x + dropout(h, deterministic=self.deterministic)

    if self.cross_attention:
      h = norm_layer(self.norm, name="pre_cross_attention_norm", **kw)(x)
      cross = Attention(use_rope=False, name="cross_attention", **attn_kw)
      has_cross_cache = layer_cache is not None and "cross_k" in layer_cache
      if encoded is not None:
        if has_cross_cache:  # prefill: compute the encoder K/V once, keep them.
          k, v = cross.project_kv(encoded)
          new_cache["cross_k"] = cache_write(layer_cache, "cross_k", k, 0)
          new_cache["cross_v"] = cache_write(layer_cache, "cross_v", v, 0)
          h, _ = cross(h, mask=cross_mask, precomputed_kv=(k, v))
        else:
          h, _ = cross(h, encoded, mask=cross_mask)
      elif has_cross_cache:  # decode step: reuse the cached encoder K/V.
        new_cache["cross_k"] = layer_cache["cross_k"]
        new_cache["cross_v"] = layer_cache["cross_v"]
        kv = (cache_read(layer_cache, "cross_k"),
              cache_read(layer_cache, "cross_v"))
        h, _ = cross(h, mask=cross_mask, precomputed_kv=kv, heads_major=True)
      else:
        raise ValueError("cross_attention needs `encoded` or a cache holding "
                         "cross_k/cross_v.")
      x = x + dropout(h, deterministic=self.deterministic)

    h = norm_layer(self.norm, name="pre_mlp_norm", **kw)(x)
    h = Mlp(self.embed_dim, self.mlp_dim, self.mlp_activation,
            self.dropout_rate, deterministic=self.deterministic, name="mlp",
            **kw)(h)
    x = x + dropout(h, deterministic=self.deterministic)
    x = constrain(x)
    return x, (new_cache if layer_cache is not None else None)


def attention_mask(query_segments, key_segments, query_positions=None,
                   key_positions=None, causal=False):
  """bool [B, T, S]: same non-zero segment, and key <= query when causal.

  Segment id 0 marks padding. Packing several documents into one row with
  distinct segment ids keeps them from seeing each other.
  """
  mask = (query_segments[:, :, None] == key_segments[:, None, :]) & (
      query_segments[:, :, None] != 0)
  if causal:
    mask &= key_positions[:, None, :] <= query_positions[:, :, None]
  return mask


class TransformerStack(nn.Module):
  """num_layers pre-norm blocks plus an optional final norm.

  __call__(x [B, T, D], ...) returns x [B, T, D] when cache is None, else
  (x, new_cache). The cache holds per-layer arrays with a leading layer axis:
  "k", "v" [L, B, K, S, H] (and "cross_k", "cross_v" [L, B, K, S_enc, H]
  for cross-attention); new keys are written at slots cache_index..+T.
  """
  num_layers: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  causal: bool = False
  cross_attention: bool = False
  use_rope: bool = False
  qk_norm: bool = False
  mlp_activation: str = "gelu"
  norm: str = "layernorm"
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  final_norm: bool = True
  dtype: str = "float32"
  param_dtype: str = "float32"

  def _block_kwargs(self, deterministic):
    return dict(
        embed_dim=self.embed_dim, num_heads=self.num_heads,
        num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
        mlp_dim=self.mlp_dim, cross_attention=self.cross_attention,
        use_rope=self.use_rope, qk_norm=self.qk_norm,
        mlp_activation=self.mlp_activation, norm=self.norm,
        dropout_rate=self.dropout_rate, dtype=self.dtype,
        param_dtype=self.param_dtype, deterministic=deterministic)

  @nn.compact
  def __call__(self, x, *, segment_ids=None, positions=None, encoded=None,
               encoded_mask=None, cache=None, cache_index=None,
               cache_valid=None, deterministic=True):
    """x: [B, T, D]. segment_ids [B, T] (0 = padding; default all 1).

    positions [B, T]: for RoPE and causality; default arange (offset by
    cache_index when decoding). encoded [B, S, D] / encoded_mask [B, S]: the
    cross-attention memory. cache_valid [B, S] (optional): cache slots that
    hold real tokens (False for left padding).
    """
    block = remat_block(TransformerBlock, self.remat_policy,
                        prevent_cse=not self.scan_layers)
    b, t, _ = x.shape
    x = constrain(x)
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)

    if cache is None:
      if positions is None:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      mask = attention_mask(segment_ids, segment_ids, positions, positions,
                            causal=self.causal)
    else:
      # Decoding: slots 0..S-1 of the cache; the T new tokens go to
      # cache_index..cache_index+T-1. A slot is visible if it is written
      # (slot <= the query's slot), valid, and (causal) not in the future.
      s = cache["k"].shape[3]  # [L, B, K, S, H]
      cache_index = jnp.asarray(cache_index, jnp.int32)
      query_slots = cache_index + jnp.arange(t, dtype=jnp.int32)  # [T]
      if positions is None:
        positions = jnp.broadcast_to(query_slots, (b, t))
      mask = jnp.arange(s)[None, None, :] <= query_slots[None, :, None]
      mask = jnp.broadcast_to(mask, (b, t, s))
      if cache_valid is not None:
        mask = mask & cache_valid[:, None, :]
      mask = mask & (segment_ids[:, :, None] != 0)

    cross_mask = None
    if self.cross_attention:
      s_enc = (encoded.shape[1] if encoded is not None
               else cache["cross_k"].shape[3])
      if encoded_mask is None:
        encoded_mask = jnp.ones((b, s_enc), bool)
      cross_mask = jnp.broadcast_to(encoded_mask[:, None, :].astype(bool),
                                    (b, t, s_enc))

    kwargs = self._block_kwargs(deterministic)
    scan_kw = dict(variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   length=self.num_layers,
                   metadata_params={nn.PARTITION_NAME: "layers"})
    if cache is not None:
      # Decoding: each layer writes its new K/V straight into the stacked
      # cache, which is carried from layer to layer (updated in place)
      # rather than sliced out and restacked (attention.cache_read).
      args = (mask, positions, encoded, cross_mask, cache_index)
      if self.scan_layers:
        def body(layer_block, carry, layer, *block_args):
          h, stacked = carry
          h, stacked = layer_block(h, dict(stacked, layer=layer), *block_args)
          return (h, stacked), None
        (x, new_cache), _ = nn.scan(
            body, in_axes=(0,) + (nn.broadcast,) * len(args), **scan_kw,
        )(block(name="layers", **kwargs), (x, cache),
          jnp.arange(self.num_layers, dtype=jnp.int32), *args)
      else:
        new_cache = cache
        for i in range(self.num_layers):
          x, new_cache = block(name=f"layers_{i}", **kwargs)(
              x, dict(new_cache, layer=jnp.int32(i)), *args)
    elif self.scan_layers:
      layers = nn.scan(
          block, in_axes=(0,) + (nn.broadcast,) * 5, **scan_kw,
      )(name="layers", **kwargs)
      x, _ = layers(x, None, mask, positions, encoded, cross_mask,
                    cache_index)
    else:
      for i in range(self.num_layers):
        x, _ = block(name=f"layers_{i}", **kwargs)(
            x, None, mask, positions, encoded, cross_mask, cache_index)

    if self.final_norm:
      x = norm_layer(self.norm, name="final_norm", dtype=self.dtype,
                     param_dtype=self.param_dtype)(x)
    if cache is None:
      return x
    return x, new_cache


def init_cache(num_layers, batch_size, max_len, num_kv_heads, head_dim,
               dtype="float32", cross_len=None):
  """A zeroed cache for TransformerStack: k, v [L, B, K, S, H] (+ cross),
  heads-major (unimm.nn.attention's module doc)."""
  shape = (num_layers, batch_size, num_kv_heads, max_len, head_dim)
  cache = {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)}
  if cross_len is not None:
    cross = (num_layers, batch_size, num_kv_heads, cross_len, head_dim)
    cache["cross_k"] = jnp.zeros(cross, dtype)
    cache["cross_v"] = jnp.zeros(cross, dtype)
  return cache


CACHE_LOGICAL_AXES = ("layers", "cache_batch", "cache_heads", "cache_len",
                      "cache_head_dim")
