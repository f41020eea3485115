"""How the decoder-only model reads images: the image-input designs.

The interleaved model always writes images as ViT-VQGAN codes (so text to
image and edits work with every setting); what differs is how an image it
is given (a document's first image: a captioning or question request, an
edit's source) enters the stream:

  codes       [BOI, h*w codes, EOI]: the codes' embeddings (Gemini /
              Chameleon); the image is read the way it is written.
  patches     [BOI, (cols READ + NEWLINE) x rows, EOI] (Fuyu, Adept 2023):
              no image encoder. Each READ slot takes one patch's raw pixels
              through one linear map into the model's width; NEWLINE ends
              every row of patches; the stream's 1-D positions are the only
              positions, so an image of any size (a multiple of the patch
              size) is read by the same weights.
  resampler   [BOI, num_queries READ, EOI] (Flamingo's perceiver resampler,
              BLIP-2's Q-Former, OneLLM's universal projection module): a
              fixed number of learned queries cross-attend to the frozen
              image tokenizer's encoder features; with num_experts > 1 a
              learned router mixes several such resamplers (OneLLM §3.2).

READ and NEWLINE are two ids after the image codes in the joint vocabulary
(unimm.models.vocab.VocabLayout with image_input set). The values READ
slots take come beside the tokens as `reads` [B, R, F]: the k-th READ slot
of a row (counting from the row's start) takes reader output k, so packed
rows, padding and several images per row need no other bookkeeping.
For "patches" a row's reads are its images' pixel patches in stream order
(F = patch_size**2 * 3, values in [-1, 1]); for "resampler" they are each
image's encoder features in turn ([M * N, F]: M images of N features), and
the reader returns num_queries embeddings per image in the same order.
READ and NEWLINE targets carry no loss: they are given, never generated.

`ImageInput` is the setting (config.model.image_input, patch_size,
num_queries, num_experts); `ImageReader` is the Flax module the model holds.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm import nn as unn

IMAGE_INPUTS = ("codes", "patches", "resampler")


@dataclasses.dataclass(frozen=True)
class ImageInput:
  """An image-input setting (see the module doc).

  kind: one of IMAGE_INPUTS. patch_size: pixels per patch side ("patches";
  packed rows carry the read images in such patches for "resampler" too).
  num_queries: READ slots per image ("resampler").
  """
  kind: str = "codes"
  patch_size: int = 4
  num_queries: int = 16

  def __post_init__(self):
    if self.kind not in IMAGE_INPUTS:
      raise ValueError(f"image_input={self.kind!r}; expected one of "
                       f"{IMAGE_INPUTS} (config.model.image_input).")
    for name in ("patch_size", "num_queries"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"image_input {name}={value!r}; expected a positive "
                         f"int (config.model.{name}).")

  @classmethod
  def of(cls, settings) -> "ImageInput":
    """The setting of a model or its config (anything with image_input,
    patch_size and num_queries: config.model, an InterleavedLM)."""
    return cls(settings.image_input, settings.patch_size,
               settings.num_queries)

  @property
  def reads_images(self) -> bool:
    """Whether given images enter as READ slots (not as codes)."""
    return self.kind != "codes"

  def check_image(self, shape) -> tuple[int, int]:
    """(rows, cols) of READ slots for an image of shape [H, W, C], or a
    ValueError naming the size this setting cannot read."""
    if len(shape) != 3 or shape[-1] != 3:
      raise ValueError(f"An image to read has shape {tuple(shape)}; expected "
                       "[H, W, 3].")
    h, w = int(shape[0]), int(shape[1])
    p = self.patch_size
    if self.kind == "patches":
      if h % p or w % p or not h or not w:
        raise ValueError(
            f"image_input='patches' reads images whose sides are multiples "
            f"of patch_size={p}; got {h}x{w}. Resize or crop it, or set "
            "config.model.patch_size to a divisor of both sides.")
      return h // p, w // p
    return 1, self.num_queries

  def span_length(self, shape) -> int:
    """Tokens of a read image's span, BOI and EOI included."""
    rows, cols = self.check_image(shape)
    newline = 1 if self.kind == "patches" else 0
    return rows * (cols + newline) + 2


def patchify(images, patch_size: int):
  """uint8 or float images [..., H, W, C] -> [..., (H/p)*(W/p), p*p*C]
  patches, row-major (the order of READ slots)."""
  *lead, h, w, c = images.shape
  p = patch_size
  x = images.reshape(*lead, h // p, p, w // p, p, c)
  x = jnp.moveaxis(x, -3, -4) if isinstance(x, jax.Array) else np.moveaxis(
      x, -3, -4)
  return x.reshape(*lead, (h // p) * (w // p), p * p * c)


def unpatchify(patches, grid: tuple[int, int], patch_size: int):
  """Inverse of patchify: [..., h*w, p*p*C] -> [..., h*p, w*p, C]."""
  *lead, _, f = patches.shape
  h, w = grid
  p = patch_size
  c = f // (p * p)
  xp = jnp if isinstance(patches, jax.Array) else np
  x = patches.reshape(*lead, h, w, p, p, c)
  x = xp.moveaxis(x, -3, -4)
  return x.reshape(*lead, h * p, w * p, c)


def pixels_to_unit(patches):
  """uint8 pixel values -> float32 in [-1, 1]."""
  return patches.astype(jnp.float32) / 127.5 - 1.0


class Resampler(nn.Module):
  """num_queries learned queries cross-attend to features [B, N, F]:
  -> [B, num_queries, D] (Perceiver resampler / Q-Former; the queries also
  attend to each other). num_experts > 1: OneLLM's mixture, a softmax router
  on the mean feature weighting each expert resampler's output."""
  num_queries: int
  embed_dim: int
  num_heads: int
  mlp_dim: int
  num_layers: int = 2
  num_experts: int = 1
  norm: str = "rmsnorm"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, features):
    b = features.shape[0]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    memory = unn.dense(self.embed_dim, ("patch", "embed"), use_bias=True,
                       name="feature_proj", **kw)(features)  # [B, N, D]
    outputs = []
    for e in range(self.num_experts):
      queries = self.param(
          f"queries_{e}",
          unn.partitioned(nn.initializers.normal(0.02), (None, "embed")),
          (self.num_queries, self.embed_dim), jnp.dtype(self.param_dtype))
      x = jnp.broadcast_to(queries[None].astype(memory.dtype),
                           (b, self.num_queries, self.embed_dim))
      x = unn.TransformerStack(
          num_layers=self.num_layers, embed_dim=self.embed_dim,
          num_heads=self.num_heads, num_kv_heads=self.num_heads,
          head_dim=self.embed_dim // self.num_heads, mlp_dim=self.mlp_dim,
          causal=False, cross_attention=True, norm=self.norm,
          scan_layers=False, name=f"expert_{e}", **kw)(x, encoded=memory)
      outputs.append(x)
    if self.num_experts == 1:
      return outputs[0]
    router = unn.dense(self.num_experts, ("embed", None), name="router",
                       **kw)(jnp.mean(memory, axis=1))  # [B, E]
    weights = jax.nn.softmax(router.astype(jnp.float32), axis=-1)
    stacked = jnp.stack(outputs, axis=1)  # [B, E, Q, D]
    return jnp.einsum("be,beqd->bqd", weights.astype(stacked.dtype), stacked)


class ImageReader(nn.Module):
  """reads [B, R, F] -> embeddings [B, R', D] of the READ slots in order:
  R' = R ("patches": one linear map per patch, no positions) or
  R / feature_length * num_queries ("resampler": images of feature_length
  features each)."""
  kind: str
  embed_dim: int
  num_heads: int = 4
  mlp_dim: int = 512
  num_queries: int = 16
  feature_length: int = 64
  resampler_layers: int = 2
  num_experts: int = 1
  norm: str = "rmsnorm"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, reads):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    if self.kind == "patches":
      if reads.dtype == jnp.uint8:
        reads = pixels_to_unit(reads)
      return unn.dense(self.embed_dim, ("patch", "embed"), use_bias=True,
                       name="patch_proj", **kw)(reads)
    if self.kind != "resampler":
      raise ValueError(f"ImageReader kind={self.kind!r}; expected 'patches' "
                       "or 'resampler'.")
    b, r, f = reads.shape
    n = self.feature_length
    if r % n:
      raise ValueError(
          f"{r} feature vectors per row is not a whole number of images of "
          f"feature_length={n} (config.model.feature_length, the image "
          "tokenizer's h*w).")
    images = reads.reshape(b * (r // n), n, f)
    out = Resampler(self.num_queries, self.embed_dim, self.num_heads,
                    self.mlp_dim, self.resampler_layers, self.num_experts,
                    self.norm, name="resampler", **kw)(images)
    return out.reshape(b, (r // n) * self.num_queries, self.embed_dim)


def place_reads(x, tokens, embeddings, read_id: int):
  """x [B, T, D] with each READ slot (tokens == read_id) replaced by the
  next of embeddings [B, R', D] (the k-th READ of a row takes row k)."""
  is_read = tokens == read_id
  index = jnp.maximum(jnp.cumsum(is_read, axis=1) - 1, 0)  # [B, T]
  index = jnp.minimum(index, embeddings.shape[1] - 1)
  taken = jnp.take_along_axis(embeddings, index[..., None], axis=1)
  return jnp.where(is_read[..., None], taken.astype(x.dtype), x)
