"""LaVIT's dynamic visual tokens (Jin et al. 2023, arXiv 2309.04669, §3.1):
a token selector and a token merger between the ViT encoder and the
quantizer, so an image becomes as many tokens as it has informative
patches.

- TokenSelector: an MLP on each patch feature, half of whose hidden units
  are averaged over the image (the global context), gives keep / drop
  log-probabilities per patch. Training samples the decision with a
  straight-through Gumbel-softmax (hard 0/1 forward, the soft sample's
  gradient backward); encoding keeps a patch where keep is the likelier.
- TokenMerger: every patch token attends causally to the kept tokens
  before it (and to itself) and cross-attends to the dropped patches'
  (layer-normed) features, so the kept tokens fold the dropped content in.
  Both attentions are weighted by the decisions as floats
  (unimm.nn.weighted_attention), which is how the reconstruction loss's
  gradient reaches the selector.
- compact(): the kept tokens, in raster order, moved to the front of a
  static [B, N] sequence with a validity mask; the ids of the dropped slots
  are -1 (unimm.tokenizers.vit_vqgan).

The keep-ratio penalty (target - the kept fraction)^2 is taken over the
whole batch by default (config.loss.keep_penalty="batch"), so a simple
image may spend fewer tokens than a busy one; "image" applies it to each
image (DynamicViT's form), which pins every image near the ratio.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm import nn as unn


def straight_through_gumbel(log_probs, rng, temperature: float = 1.0):
  """A hard one-hot sample of log_probs [..., C] with the gradient of the
  Gumbel-softmax sample (Jang et al. 2017; torch's gumbel_softmax(hard=1))."""
  gumbel = jax.random.gumbel(rng, log_probs.shape, jnp.float32)
  soft = jax.nn.softmax((log_probs.astype(jnp.float32) + gumbel) / temperature)
  hard = jax.nn.one_hot(jnp.argmax(soft, axis=-1), soft.shape[-1],
                        dtype=soft.dtype)
  return hard + (soft - jax.lax.stop_gradient(soft))  # exactly 0 or 1


def compact(tokens, keep):
  """Kept tokens first, in raster order.

  tokens [B, N, ...] (or a pytree of such arrays, moved alike), keep [B, N]
  (1 = kept) -> (tokens [B, N, ...] with the kept ones at slots 0..n_b-1,
  mask bool [B, N] of those slots). Gradients flow to the kept tokens.
  """
  kept = keep > 0.5
  order = jnp.argsort(jnp.where(kept, 0, 1), axis=1, stable=True)  # [B, N]

  def move(x):
    index = order.reshape(*order.shape, *([1] * (x.ndim - 2)))
    return jnp.take_along_axis(x, index, axis=1)

  moved = jax.tree.map(move, tokens)
  count = jnp.sum(kept, axis=1, keepdims=True)
  mask = jnp.arange(keep.shape[1])[None, :] < count
  return moved, mask


class TokenSelector(nn.Module):
  """Patch features [B, N, D] -> keep / drop log-probabilities [B, N, 2]
  (LaVIT's TokenPredictor: local half per patch, global half averaged)."""
  embed_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    d = self.embed_dim
    x = unn.norm_layer("layernorm", name="norm", dtype=self.dtype,
                       param_dtype=self.param_dtype)(x)
    x = nn.gelu(unn.dense(d, ("embed", "mlp"), name="in_proj", **kw)(x))
    local, context = jnp.split(x, 2, axis=-1)
    context = jnp.broadcast_to(jnp.mean(context, axis=1, keepdims=True),
                               context.shape)
    x = jnp.concatenate([local, context], axis=-1)
    x = nn.gelu(unn.dense(max(d // 2, 2), ("mlp", None), name="hidden_0",
                          **kw)(x))
    x = nn.gelu(unn.dense(max(d // 4, 2), (None, None), name="hidden_1",
                          **kw)(x))
    logits = unn.dense(2, (None, None), name="out", **kw)(x)
    return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


class MergerBlock(nn.Module):
  """x + CausalAttn(norm x; kept keys) + CrossAttn(norm x; dropped
  features) + Mlp(norm x), with the decisions as attention weights."""
  embed_dim: int
  num_heads: int
  mlp_dim: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, features, keep):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = dict(num_heads=self.num_heads, num_kv_heads=self.num_heads,
                head_dim=self.embed_dim // self.num_heads,
                embed_dim=self.embed_dim, **kw)
    n = x.shape[1]
    eye = jnp.eye(n, dtype=keep.dtype)
    causal = jnp.tril(jnp.ones((n, n), keep.dtype))
    # Key s is visible to query t if kept (or s == t), and s <= t.
    self_weights = (keep[:, None, :] + (1.0 - keep[:, None, :]) * eye) * causal
    h = unn.norm_layer("layernorm", name="pre_attention_norm", **kw)(x)
    x = x + unn.Attention(name="self_attention", **attn)(
        h, weights=self_weights)[0]
    cross_weights = jnp.broadcast_to((1.0 - keep)[:, None, :],
                                     (x.shape[0], n, n))
    h = unn.norm_layer("layernorm", name="pre_cross_attention_norm", **kw)(x)
    x = x + unn.Attention(name="cross_attention", **attn)(
        h, features, weights=cross_weights)[0]
    h = unn.norm_layer("layernorm", name="pre_mlp_norm", **kw)(x)
    return x + unn.Mlp(self.embed_dim, self.mlp_dim, name="mlp", **kw)(h)


class _ScannedMergerBlock(MergerBlock):
  """MergerBlock in nn.scan's (carry, output) form."""

  def __call__(self, x, features, keep):  # pylint: disable=arguments-renamed
    return super().__call__(x, features, keep), None


class TokenMerger(nn.Module):
  """num_layers MergerBlocks over the encoder's patch tokens [B, N, D]
  with keep [B, N] (floats, 1 = kept) -> merged tokens [B, N, D]."""
  num_layers: int
  embed_dim: int
  num_heads: int
  mlp_dim: int
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x, keep):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    features = unn.norm_layer("layernorm", name="feature_norm", **kw)(x)
    args = (self.embed_dim, self.num_heads, self.mlp_dim)
    # Each block holds [B, heads, N, N] attention weights twice: at paper
    # shapes the blocks are scanned and rematerialized (the model's
    # scan_layers and remat_policy), as the transformer stacks are.
    if self.scan_layers:
      block = unn.remat_block(_ScannedMergerBlock, self.remat_policy,
                              prevent_cse=False)
      x, _ = nn.scan(
          block, variable_axes={"params": 0}, split_rngs={"params": True},
          in_axes=(nn.broadcast, nn.broadcast), length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"},
      )(*args, name="layers", **kw)(x, features, keep)
    else:
      block = unn.remat_block(MergerBlock, self.remat_policy)
      for i in range(self.num_layers):
        x = block(*args, name=f"layers_{i}", **kw)(x, features, keep)
    return unn.norm_layer("layernorm", name="final_norm", **kw)(x)
