"""Factorized, l2-normalised vector quantizer (ViT-VQGAN §3.2).

The encoder output [B, T, D] is projected to a low-dimensional lookup space
(code_dim, e.g. 8-32), l2-normalised, and matched to the l2-normalised
codebook by cosine similarity (on the unit sphere the Euclidean nearest code
is the most cosine-similar one). The chosen code is projected back to D for
the decoder. Gradients pass the quantization by the straight-through
estimator (VQ-VAE, van den Oord et al. 2017, eq. 3).

Codebook usage is tracked outside the module, as pure functions over arrays
kept in the task's model_state: an EMA of per-code assignment counts and a
buffer of recent latents used to restart dead codes.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.nn.layers import dense, partitioned


def l2_normalize(x, axis=-1, eps=1e-6):
  """x / ||x||, computed in float32."""
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.sum(x * x, axis=axis, keepdims=True) + eps)


def nearest_codes(latents, codebook):
  """ids of the most cosine-similar codes.

  latents: [..., C] and codebook [K, C], both l2-normalised. For unit vectors
  ||z - e||^2 = 2 - 2 z.e, so the argmax of z.e is the Euclidean nearest.
  """
  similarity = jnp.einsum("...c,kc->...k", latents, codebook)  # [..., K]
  return jnp.argmax(similarity, axis=-1).astype(jnp.int32)


class FactorizedQuantizer(nn.Module):
  """Projects D -> code_dim, quantizes on the unit sphere, projects back.

  __call__(x [B, T, D], mask=None) returns (ids [B, T] int32, quantized
  [B, T, D], losses {"codebook", "commitment", "vq"}, latents [B, T,
  code_dim] l2-normalised encoder latents, for dead-code restarts); mask
  (bool [B, T]) limits the losses to the tokens it marks.
  """
  num_codes: int
  code_dim: int
  embed_dim: int
  commitment_cost: float = 0.25
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, use_bias=True)
    # ViT-VQGAN §3.2: factorized codes, a linear map to the lookup space ...
    self.to_code = dense(self.code_dim, ("embed", "code_dim"), name="to_code",
                         **kw)
    # ... and back to the decoder width after lookup.
    self.from_code = dense(self.embed_dim, ("code_dim", "embed"),
                           name="from_code", **kw)
    self.codebook = self.param(
        "codebook", partitioned(nn.initializers.normal(1.0),
                                ("codes", "code_dim")),
        (self.num_codes, self.code_dim), jnp.dtype(self.param_dtype))

  def normalized_codebook(self):  # [K, C]
    return l2_normalize(self.codebook)

  def latents(self, x):
    """x [B, T, D] -> l2-normalised lookup latents [B, T, C] (float32)."""
    return l2_normalize(self.to_code(x))

  def encode(self, x):
    """x [B, T, D] -> code ids [B, T] int32."""
    return nearest_codes(self.latents(x), self.normalized_codebook())

  def embed_ids(self, ids):
    """ids [B, T] -> decoder inputs [B, T, D] (for decoding from ids)."""
    codes = jnp.take(self.normalized_codebook(), ids, axis=0)  # [B, T, C]
    return self.from_code(codes.astype(jnp.dtype(self.dtype)))

  def __call__(self, x, mask=None):
    z = self.latents(x)  # [B, T, C], unit norm
    codebook = self.normalized_codebook()  # [K, C], unit norm
    ids = nearest_codes(z, codebook)  # [B, T]
    e = jnp.take(codebook, ids, axis=0)  # [B, T, C]
    # VQ-VAE eq. 3 on the normalised vectors: the codebook term moves codes
    # towards (frozen) latents, the commitment term (weight beta) moves the
    # encoder towards (frozen) codes. Mean over tokens and code dims.
    if mask is None:
      mean = jnp.mean
    else:
      weights = jnp.broadcast_to(mask[..., None], z.shape).astype(z.dtype)
      mean = lambda x: jnp.sum(x * weights) / jnp.maximum(  # noqa: E731
          jnp.sum(weights), 1.0)
    codebook_loss = mean(jnp.square(jax.lax.stop_gradient(z) - e))
    commitment_loss = mean(jnp.square(z - jax.lax.stop_gradient(e)))
    losses = {
        "codebook": codebook_loss,
        "commitment": commitment_loss,
        "vq": codebook_loss + self.commitment_cost * commitment_loss,
    }
    # Straight-through estimator: forward uses e, backward copies dL/de to z.
    quantized = z + jax.lax.stop_gradient(e - z)
    quantized = self.from_code(quantized.astype(jnp.dtype(self.dtype)))
    return ids, quantized, losses, z


# ---------------------------------------------------------------------------
# Codebook usage tracking and dead-code restart (pure functions).
#
# Under jax.jit with global (sharded) arrays, `code_counts` sums over the
# *global* batch: XLA inserts the cross-device reduction, so every device sees
# the same counts, the same EMA and the same restarted codebook with no
# explicit all-reduce. (With pmap/shard_map one would need a psum here.)
# ---------------------------------------------------------------------------


def code_counts(ids, num_codes: int):
  """Number of tokens assigned to each code in this batch: [K] float32.
  Negative ids (the empty slots of dynamic tokens) count nowhere."""
  ids = ids.reshape(-1)
  ids = jnp.where(ids >= 0, ids, num_codes)  # out of range: dropped
  return jnp.zeros((num_codes,), jnp.float32).at[ids].add(1.0, mode="drop")


def update_usage(usage, ids, decay: float = 0.99):
  """EMA of per-code counts per batch: usage [K] -> new usage [K]."""
  counts = code_counts(ids, usage.shape[0])
  return decay * usage + (1.0 - decay) * counts


def perplexity(ids, num_codes: int):
  """exp(entropy) of this batch's code histogram (1 = one code, K = uniform)."""
  counts = code_counts(ids, num_codes)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)),
                               0.0))
  return jnp.exp(entropy)


def update_latent_buffer(buffer, latents, rng, errors=None):
  """Replaces buffer [N, C] with N latents drawn at random from [..., C].

  errors (optional, [...] matching latents' leading dims, >= 0): draw each
  latent with probability proportional to its quantization error, as k-means++
  seeds new centres (Arthur & Vassilvitskii 2007). Restarted codes then land
  where the codebook fits the data worst (on images: object edges, not the
  flat background that most tokens show), rather than next to live codes.
  """
  flat = latents.reshape(-1, latents.shape[-1]).astype(buffer.dtype)
  if errors is None:
    idx = jax.random.randint(rng, (buffer.shape[0],), 0, flat.shape[0])
  else:
    # Inverse-CDF sampling: O(M + N log M), where jax.random.categorical's
    # Gumbel-max draws N x M noise (half of a tiny tokenizer's train step
    # on CPU). A floor on the weights keeps all-zero errors uniform.
    weights = jnp.maximum(errors.reshape(-1).astype(jnp.float32), 1e-12)
    cdf = jnp.cumsum(weights)
    u = jax.random.uniform(rng, (buffer.shape[0],)) * cdf[-1]
    idx = jnp.minimum(jnp.searchsorted(cdf, u, side="right"),
                      flat.shape[0] - 1)
  return jnp.take(flat, idx, axis=0)


def quantization_error(latents, ids, codebook):
  """Squared distance of each latent to its code: [...]; latents [..., C],
  ids [...], codebook [K, C] (both l2-normalised)."""
  e = jnp.take(codebook, ids, axis=0)
  return jnp.sum(jnp.square(latents.astype(jnp.float32) - e), axis=-1)


def restart_dead_codes(codebook, usage, latents_buffer, rng, threshold: float):
  """Replaces codes whose EMA usage < threshold with random recent latents.

  codebook [K, C] (raw parameter), usage [K], latents_buffer [N, C].
  Restarted codes get l2-normalised latents (the codebook lives on the unit
  sphere) and their usage is reset to the mean usage, so they have a grace
  period to be picked before they can count as dead again.
  Returns (new_codebook, new_usage, num_restarted).
  """
  k = codebook.shape[0]
  n = latents_buffer.shape[0]
  if n >= k:  # distinct latents for distinct codes when the buffer allows
    idx = jax.random.permutation(rng, n)[:k]
  else:
    idx = jax.random.randint(rng, (k,), 0, n)
  candidates = l2_normalize(jnp.take(latents_buffer, idx, axis=0))  # [K, C]
  dead = usage < threshold  # [K]
  new_codebook = jnp.where(dead[:, None], candidates.astype(codebook.dtype),
                           codebook)
  new_usage = jnp.where(dead, jnp.mean(usage), usage)
  return new_codebook, new_usage, jnp.sum(dead.astype(jnp.int32))
