"""Parti-style text-to-image: a text encoder and an image-token decoder with
cross-attention (Yu et al. 2022, "Scaling Autoregressive Models for
Content-Rich Text-to-Image Generation", §2.2), built from the shared stack.

Decoder vocabulary: the tokenizer's `image_vocab_size` codes plus one BOS id
(= image_vocab_size) that starts every image. Logits cover the codes only.

Variable-length images (end_of_image=True, for LaVIT's dynamic tokens,
unimm.tokenizers.dynamic): image_ids [B, image_length] hold an image's
codes and then -1 in its empty slots; the decoder writes the codes and an
EOI id (= image_vocab_size, a logit; BOS moves to image_vocab_size + 1)
over image_length + 1 positions, the loss covers the codes and the EOI
(`image_targets`), and sampling decodes with the shared step until every
row has written its EOI (sampler.while_decode, a static bound) and
returns -1 after it.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm import nn as unn
from unimm.models import t5 as t5_lib
from unimm.sampling import sampler as samp

# Parti Table 1 (encoder layers, decoder layers, model dim, mlp dim, heads),
# plus CPU sizes for the shapes world.
SIZES = {
    "tiny": dict(encoder_layers=2, decoder_layers=4, embed_dim=128,
                 mlp_dim=512, num_heads=4),
    # The tiny width with twice its decoder layers: configs/parti_shapes.py's
    # longer run (pairs of objects need the depth; README results).
    "tiny_deep": dict(encoder_layers=2, decoder_layers=8, embed_dim=128,
                      mlp_dim=512, num_heads=4),
    "small": dict(encoder_layers=4, decoder_layers=8, embed_dim=256,
                  mlp_dim=1024, num_heads=8),
    "350m": dict(encoder_layers=12, decoder_layers=12, embed_dim=1024,
                 mlp_dim=4096, num_heads=16),
    "750m": dict(encoder_layers=12, decoder_layers=36, embed_dim=1024,
                 mlp_dim=4096, num_heads=16),
    "3b": dict(encoder_layers=12, decoder_layers=36, embed_dim=2048,
               mlp_dim=8192, num_heads=32),
    "20b": dict(encoder_layers=16, decoder_layers=64, embed_dim=4096,
                mlp_dim=16384, num_heads=64),
}


def parti_config(size: str, **overrides) -> dict:
  """Model kwargs for a size in SIZES (head_dim = embed_dim / num_heads)."""
  if size not in SIZES:
    raise ValueError(f"Unknown Parti size {size!r}; expected one of "
                     f"{list(SIZES)} (config argument size=...).")
  kw = dict(SIZES[size])
  kw["head_dim"] = kw["embed_dim"] // kw["num_heads"]
  kw["num_kv_heads"] = kw["num_heads"]
  kw.update(overrides)
  return kw


class Parti(nn.Module):
  """Text ids [B, S] -> logits over image codes [B, T, image_vocab_size]."""
  text_vocab_size: int
  image_vocab_size: int
  text_length: int
  image_length: int  # h * w image tokens
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  encoder_layers: int
  decoder_layers: int
  # "learned": one table over the image_length positions; "learned_2d": a
  # row table plus a column table over the square token grid (each row and
  # column embedding is trained by every image, so layout is learned
  # sooner); "rope": rotary positions in every attention layer.
  positions: str = "learned"
  qk_norm: bool = False
  mlp_activation: str = "gelu"
  norm: str = "layernorm"
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"
  # "transformer": unimm's encoder stack above; "t5": a T5 encoder (Parti
  # §2.2) shaped by the t5_* fields (models.t5.t5_config of a checkpoint),
  # projected to embed_dim if its width differs. Its weights are loaded by
  # load_t5_into (ParTask does that when config.t5_checkpoint is set).
  text_encoder: str = "transformer"
  t5_vocab_size: int = 0
  t5_d_model: int = 0
  t5_num_layers: int = 0
  t5_num_heads: int = 0
  t5_d_kv: int = 0
  t5_d_ff: int = 0
  t5_feed_forward_proj: str = "relu"
  t5_relative_attention_num_buckets: int = 32
  t5_relative_attention_max_distance: int = 128
  # Images of varying length: codes, then EOI (module doc).
  end_of_image: bool = False

  @property
  def eoi_id(self) -> int:
    """The end-of-image id (a logit) when end_of_image."""
    return self.image_vocab_size

  @property
  def bos_id(self) -> int:
    return self.image_vocab_size + int(self.end_of_image)

  @property
  def output_vocab_size(self) -> int:
    """Logits per position: the codes (+ EOI when end_of_image)."""
    return self.image_vocab_size + int(self.end_of_image)

  @property
  def decoder_length(self) -> int:
    """Decoder positions per image: image_length (+ 1 for the EOI)."""
    return self.image_length + int(self.end_of_image)

  def setup(self):
    if self.positions not in ("learned", "learned_2d", "rope"):
      raise ValueError(f"positions must be 'learned', 'learned_2d' or 'rope', "
                       f"got {self.positions!r} (config.model.positions).")
    side = math.isqrt(self.image_length)
    if self.positions == "learned_2d" and (side * side != self.image_length
                                           or self.end_of_image):
      raise ValueError(
          f"positions='learned_2d' needs a square token grid, got "
          f"image_length={self.image_length}, end_of_image="
          f"{self.end_of_image} (config.model.image_length; variable-length "
          "images are 1-D: positions='learned' or 'rope').")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    stack = dict(embed_dim=self.embed_dim, num_heads=self.num_heads,
                 num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                 mlp_dim=self.mlp_dim, use_rope=self.positions == "rope",
                 qk_norm=self.qk_norm, mlp_activation=self.mlp_activation,
                 norm=self.norm, dropout_rate=self.dropout_rate,
                 scan_layers=self.scan_layers, remat_policy=self.remat_policy,
                 **kw)
    if self.text_encoder not in ("transformer", "t5"):
      raise ValueError(f"text_encoder must be 'transformer' or 't5', got "
                       f"{self.text_encoder!r} (config.model.text_encoder).")
    if self.text_encoder == "t5":
      if self.t5_d_model <= 0 or self.t5_vocab_size > self.text_vocab_size:
        raise ValueError(
            f"text_encoder='t5' needs the t5_* fields of the checkpoint "
            f"(t5_d_model={self.t5_d_model}, t5_vocab_size="
            f"{self.t5_vocab_size} <= text_vocab_size="
            f"{self.text_vocab_size}); set them from "
            "unimm.models.t5.t5_config (config arg t5=PATH).")
      self.t5 = t5_lib.T5Encoder(
          vocab_size=self.t5_vocab_size, d_model=self.t5_d_model,
          num_layers=self.t5_num_layers, num_heads=self.t5_num_heads,
          d_kv=self.t5_d_kv, d_ff=self.t5_d_ff,
          feed_forward_proj=self.t5_feed_forward_proj,
          relative_attention_num_buckets=(
              self.t5_relative_attention_num_buckets),
          relative_attention_max_distance=(
              self.t5_relative_attention_max_distance), dtype=self.dtype)
      if self.t5_d_model != self.embed_dim:
        self.text_proj = unn.dense(self.embed_dim, ("embed", "embed"),
                                   name="text_proj", **kw)
    self.text_embed = unn.Embedder(self.text_vocab_size, self.embed_dim, **kw)
    self.image_embed = unn.Embedder(self.bos_id + 1, self.embed_dim, **kw)
    self.encoder = unn.TransformerStack(num_layers=self.encoder_layers,
                                        causal=False, **stack)
    self.decoder = unn.TransformerStack(num_layers=self.decoder_layers,
                                        causal=True, cross_attention=True,
                                        **stack)
    if self.positions != "rope":
      self.text_positions = unn.LearnedPositions(self.text_length,
                                                 self.embed_dim,
                                                 self.param_dtype)
    if self.positions == "learned":
      self.image_positions = unn.LearnedPositions(self.decoder_length,
                                                  self.embed_dim,
                                                  self.param_dtype)
    elif self.positions == "learned_2d":
      self.image_rows = unn.LearnedPositions(side, self.embed_dim,
                                             self.param_dtype)
      self.image_cols = unn.LearnedPositions(side, self.embed_dim,
                                             self.param_dtype)
    self.logits_proj = unn.dense(self.output_vocab_size, ("embed", "vocab"),
                                 name="logits", **kw)

  def encode(self, text_ids, deterministic=True):
    """text_ids [B, S] (0 = padding) -> (encoded [B, S, D], mask [B, S])."""
    mask = text_ids != 0
    if self.text_encoder == "t5":
      x = self.t5(text_ids, mask)  # [B, S, t5_d_model]
      if self.t5_d_model != self.embed_dim:
        x = self.text_proj(x)
      return x, mask
    x = self.text_embed.encode(text_ids)
    if self.positions != "rope":
      x = self.text_positions(x)
    x = self.encoder(x, segment_ids=mask.astype(jnp.int32),
                     deterministic=deterministic)
    return x, mask

  def _embed_image_tokens(self, tokens, positions):
    x = self.image_embed.encode(tokens)  # [B, T, D]
    if self.positions == "learned":
      x = self.image_positions(x, positions)
    elif self.positions == "learned_2d":
      side = math.isqrt(self.image_length)
      x = self.image_cols(self.image_rows(x, positions // side),
                          positions % side)
    return x

  def decode(self, image_inputs, encoded, text_mask, deterministic=True):
    """Teacher forcing: image_inputs [B, T] = [BOS, ids[:-1]] -> logits."""
    b, t = image_inputs.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = self._embed_image_tokens(image_inputs, positions)
    x = self.decoder(x, encoded=encoded, encoded_mask=text_mask,
                     positions=positions, deterministic=deterministic)
    return self.logits_proj(x)  # [B, T, V]

  def __call__(self, text_ids, image_ids, deterministic=True):
    """text_ids [B, S], image_ids [B, image_length] -> next-token logits
    [B, decoder_length, output_vocab_size] (the targets: image_targets)."""
    encoded, text_mask = self.encode(text_ids, deterministic)
    targets, _ = image_targets(self, image_ids)
    bos = jnp.full((targets.shape[0], 1), self.bos_id, targets.dtype)
    inputs = jnp.concatenate([bos, targets[:, :-1]], axis=1)
    return self.decode(inputs, encoded, text_mask, deterministic)

  def decode_step(self, tokens, cache, position, encoded=None):
    """One cached decoder step: tokens [B, 1] at `position` -> logits [B, V].

    cache: {"k", "v", "cross_k", "cross_v": [L, B, ...], "text_mask": [B, S]}.
    Pass `encoded` on the first step (prefill): the cross-attention K/V are
    computed once and kept in the cache for every later step.
    """
    logits, cache = self.decode_window(tokens, cache, position, encoded)
    return logits[:, -1], cache

  def decode_window(self, tokens, cache, position, encoded=None):
    """tokens [B, T] at position..position+T-1 -> logits [B, T, V] (token
    i's next-token logits, causal within the window and over the cache
    before it), cache. Slots from `position` on are overwritten, so a
    window may be fed again from any slot (speculative decoding)."""
    b = tokens.shape[0]
    positions = jnp.full((b, tokens.shape[1]), position, jnp.int32) + \
        jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x = self._embed_image_tokens(tokens, positions)
    layers = {k: v for k, v in cache.items() if k != "text_mask"}
    x, layers = self.decoder(x, encoded=encoded,
                             encoded_mask=cache["text_mask"],
                             positions=positions, cache=layers,
                             cache_index=position)
    logits = self.logits_proj(x)  # [B, T, V]
    return logits, dict(layers, text_mask=cache["text_mask"])

  def init_cache(self, batch_size: int, text_mask):
    """Zeroed decoder cache for `batch_size` rows and text_mask [B, S]."""
    cache = unn.init_cache(self.decoder_layers, batch_size,
                           self.decoder_length,
                           self.num_kv_heads, self.head_dim, self.dtype,
                           cross_len=text_mask.shape[1])
    return dict(cache, text_mask=text_mask)


def image_targets(model: Parti, image_ids):
  """The decoder's targets of image_ids [B, image_length] and their loss
  weights, both [B, decoder_length].

  Fixed length: the ids themselves, all weighted. end_of_image: each row's
  codes (ids >= 0, the valid ones first), the EOI id in the first empty
  slot (or after the last code), the EOI again after it (fed, not scored);
  the codes and the first EOI weigh 1.
  """
  if not model.end_of_image:
    return image_ids, jnp.ones(image_ids.shape, jnp.float32)
  b = image_ids.shape[0]
  ids = jnp.concatenate([image_ids, jnp.full((b, 1), -1, image_ids.dtype)],
                        axis=1)  # [B, T + 1]
  length = jnp.sum(image_ids >= 0, axis=1, keepdims=True)
  slots = jnp.arange(ids.shape[1])[None, :]
  targets = jnp.where(slots < length, ids, model.eoi_id)
  return targets, (slots <= length).astype(jnp.float32)


def load_t5_into(params, checkpoint: str):
  """params of a Parti with text_encoder='t5', with the encoder's weights
  replaced by the T5 checkpoint's (boxes and shardings are kept)."""
  _, t5_params = t5_lib.load_t5_encoder(checkpoint)
  inner = params["params"]
  if "t5" not in inner:
    raise ValueError("These Parti params have no T5 encoder; set "
                     "config.model.text_encoder='t5' (config arg t5=PATH).")

  def put(box, value):
    old = box.value if isinstance(box, nn.Partitioned) else box
    if old.shape != value.shape:
      raise ValueError(f"T5 weight of shape {value.shape} does not fit the "
                       f"model's {old.shape}; build the model from the same "
                       "checkpoint's config.json.")
    value = jnp.asarray(value, old.dtype)
    return box.replace(value=value) if isinstance(box, nn.Partitioned) else (
        value)

  t5 = jax.tree.map(put, inner["t5"], t5_params,
                    is_leaf=lambda x: isinstance(x, nn.Partitioned))
  return dict(params, params=dict(inner, t5=t5))


def sample_image_ids(model: Parti, params, text_ids, rng, sampling,
                     uncond_text_ids=None, return_steps: bool = False):
  """Samples image ids [B, image_length] for text_ids [B, S].

  The encoder runs once; the first decoder step (prefill) computes the
  cross-attention K/V into the cache; the remaining tokens are one lax.scan
  of the shared sampler, or with sampling.sjd_window one while_loop of
  speculative Jacobi decoding (sampler.sjd_decode: the same distribution
  in fewer decoder calls). With sampling.doubled (cfg_scale or
  contrastive_alpha set), `uncond_text_ids` [B, S] (the dropped-text prompt
  used in training) forms the second half of a doubled batch: guidance's
  unconditional logits, or CD-K's amateur. return_steps: also return the
  decoder calls made (scalar int32; image_length without SJD). Call under
  jax.jit: one compiled program. end_of_image: the rest is one
  lax.while_loop of the same step (sampler.while_decode) that ends when
  every row has written its EOI, at most image_length steps; a row's slots
  from its EOI on are -1.
  """
  sampling.check_sjd_window()
  if sampling.sjd_window and model.end_of_image:
    raise ValueError(
        f"sjd_window={sampling.sjd_window}: speculative Jacobi decoding "
        "drafts fixed-length image spans, and this model's end at an EOI "
        "(config.model.end_of_image); set sjd_window=0.")
  b = text_ids.shape[0]
  if sampling.doubled:
    if uncond_text_ids is None:
      raise ValueError(
          f"cfg_scale={sampling.cfg_scale}, contrastive_alpha="
          f"{sampling.contrastive_alpha}: guidance and CD-K need "
          "uncond_text_ids [B, S] (the empty prompt) for the second half of "
          "the batch; pass them, or set both to None.")
    text_ids = jnp.concatenate([text_ids, uncond_text_ids], axis=0)  # [2B, S]
  encoded, text_mask = model.apply(params, text_ids, method=Parti.encode)
  cache = model.init_cache(text_ids.shape[0], text_mask)

  def step(params, cache, tokens, position, encoded=None):
    return model.apply(params, tokens, cache, position, encoded,
                       method=Parti.decode_step)

  def window_step(params, cache, tokens, position):
    return model.apply(params, tokens, cache, position,
                       method=Parti.decode_window)

  bos = jnp.full((text_ids.shape[0], 1), model.bos_id, jnp.int32)
  logits, cache = step(params, cache, bos, 0, encoded)
  rng_first, rng_rest = jax.random.split(rng)
  first = samp.next_token(logits, samp.draw_uniforms(rng_first, (b,)),
                          sampling)  # [B]
  n = model.decoder_length - 1
  if sampling.sjd_window and n > 1:
    rest, _, calls = samp.sjd_decode(window_step, params, cache, first, 1, n,
                                     rng_rest, sampling)
  elif model.end_of_image:  # until every row wrote its EOI, at most n
    rest, _, _, calls = samp.while_decode(
        step, params, cache, first, 1, n, rng_rest, sampling,
        stop_tokens=[model.eoi_id], pad_id=model.eoi_id,
        done=first == model.eoi_id)
  else:
    rest, _ = samp.scan_decode(step, params, cache, first, 1, n, rng_rest,
                               sampling)
    calls = jnp.int32(n)
  ids = jnp.concatenate([first[:, None], rest], axis=1)[:b]
  if model.end_of_image:  # codes, then -1 from the EOI on
    ended = jnp.cumsum(ids == model.eoi_id, axis=1) > 0
    ids = jnp.where(ended, -1, ids)[:, :model.image_length]
  return (ids, calls + 1) if return_steps else ids
