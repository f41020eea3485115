"""A Gemini/Chameleon-style decoder-only model over one stream of text and
image tokens (Team Gemini 2023; Chameleon Team 2024), from the shared stack.

One causal transformer and one embedding table over the joint vocabulary
(unimm.models.vocab.VocabLayout: specials, text ids, image codes), tied to
the read-out. Multi-query attention by default (Gemini), QK-norm available
(Chameleon §2.3 found it necessary for stable mixed-modal training), RoPE
positions over the stream, and optionally a learned 2-D (row, column)
embedding added to the tokens of each image span ("image_positions='2d'"):
a token's place in its image is its distance from the span's begin-of-image
token, so no side input is needed and packed rows work unchanged.

Padding is the PAD id (0): PAD tokens are invisible (attention never reads
them) and do not advance positions, in training (segment id 0) and in
decoding (the cache marks their slots invalid), so a row can be left-padded
or can idle while other rows of the batch decode.

Given images are read by the setting image_input (unimm.models.image_input:
"codes" as above, "patches" as in Fuyu, "resampler" as in Flamingo / BLIP-2
/ OneLLM): with a reading setting, READ slots (read_id) take the reader's
embeddings of `reads` [B, R, F] in order, and NEWLINE (newline_id) ends each
row of Fuyu patches; images are still written as codes.

Variable-length image spans (end_of_image=True, for LaVIT's dynamic
tokens, unimm.tokenizers.dynamic): a span holds up to image_length codes
and the model writes its EOI itself (trained as any other target); the
image phase of the sampler is one lax.while_loop that stops when every row
has written its EOI, at most image_length steps (sampler.while_decode), and
a row that stopped early idles on PAD (invisible, no position), so its
document goes on exactly as a shorter span was trained. 1-D positions only.

What the model writes in image spans is the setting image_output:
"codes" (the default) predicts each code with the shared read-out;
"embeddings" is Emu's continuous output (Sun et al. 2023, arXiv
2307.05222): every image slot holds a continuous embedding instead of a
code's embedding. Its input is image_in(e) and the regression head
image_out predicts the next slot's e, trained by l2 (image spans carry no
cross-entropy). The e of a code is a row of frozen_image_table [codes,
embedding_dim], the frozen tokenizer's vector for that code as its decoder
(and the diffusion de-tokenizer with condition "codes") reads it, so
packed rows of codes train it unchanged; in generation each regressed e
is fed back through the same cache step (decode_regress) and the
de-tokenizer decodes them (unimm.inference.detokenizer). With
image_head="gmm" (GIVT, Tschannen et al. 2023) the head gives a mixture of
`mixtures` diagonal Gaussians instead of one vector, trained by its
negative log-likelihood and sampled in generation (mixture_nll,
sample_mixture), so a span whose next vector has several likely values
commits to one rather than regressing to their mean.
"queries" is the output-query design of NExT-GPT / SEED-X (Wu et al. 2023,
arXiv 2309.05519; Ge et al. 2024, arXiv 2404.14396): a written image span
holds image_length learned queries (image_queries, one per slot of the
de-tokenizer's condition) instead of its codes, and a projector (a
two-layer MLP, image_proj then image_out) maps each query's hidden state to
that slot's code vector, trained to match it (l2; the same frozen table
and de-tokenizer as "embeddings"). The span is written in one parallel
pass, with no feedback (decode_queries). Since a written span's inputs
carry no image, the model must read given images another way: "queries"
needs a reading setting (image_input "patches" or "resampler"), in which
the image opening a document is READ slots and every code span is written.
"""
import functools

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np

from unimm import nn as unn
from unimm.models import image_input as image_input_lib
from unimm.sampling import sampler as samp

PAD_ID = 0  # = VocabLayout.PAD
IMAGE_OUTPUTS = ("codes", "embeddings", "queries")
IMAGE_HEADS = ("l2", "gmm")
MIN_SCALE = 0.05  # the mixture's smallest standard deviation

# CPU sizes for the shapes world, and Gemini/Chameleon-like 1B and 7B shapes
# (multi-query attention, gated MLPs at the larger sizes).
SIZES = {
    "tiny": dict(num_layers=4, embed_dim=128, mlp_dim=512, num_heads=4),
    # The tiny width, twice as deep: configs/interleaved_shapes.py's default
    # (README results: better at every task than tiny, at half its steps/s).
    "tiny_deep": dict(num_layers=8, embed_dim=128, mlp_dim=512, num_heads=4),
    "small": dict(num_layers=8, embed_dim=256, mlp_dim=1024, num_heads=8),
    "1b": dict(num_layers=24, embed_dim=2048, mlp_dim=5632, num_heads=16,
               mlp_activation="geglu"),
    "7b": dict(num_layers=32, embed_dim=4096, mlp_dim=14336, num_heads=32,
               mlp_activation="swiglu"),
}


def interleaved_config(size: str, **overrides) -> dict:
  """InterleavedLM kwargs for a row of SIZES (MQA: one KV head)."""
  if size not in SIZES:
    raise ValueError(f"Unknown interleaved model size {size!r}; expected one "
                     f"of {list(SIZES)} (config arg size=...).")
  kw = dict(SIZES[size])
  kw["head_dim"] = kw["embed_dim"] // kw["num_heads"]
  kw.setdefault("num_kv_heads", 1)
  kw.update(overrides)
  return kw


def image_span_index(tokens, positions, boi_id: int, last_boi=None):
  """Each token's index inside its image span (-1 where there is none).

  tokens, positions [B, T]: positions count a document's real tokens from
  0 (PAD slots do not count; a packed row restarts them per document, and
  a BOI never reaches across that restart). last_boi [B]: the position of
  the current document's latest BOI before this chunk (-1 if none), for
  decoding chunk by chunk. Returns (span_index [B, T], new last_boi [B]).
  Index 0 is the first image token after BOI; the caller keeps indices
  < h*w (EOI and later text are at h*w and beyond).
  """
  b, t = tokens.shape
  if last_boi is None:
    last_boi = jnp.full((b,), -1, jnp.int32)
  slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
  boi_slot = jax.lax.cummax(jnp.where(tokens == boi_id, slots, -1), axis=1)
  start_slot = jax.lax.cummax(jnp.where(
      (positions == 0) & (tokens != PAD_ID), slots, -1), axis=1)
  in_chunk = (boi_slot >= 0) & (boi_slot >= start_slot)
  boi_in_chunk = jnp.take_along_axis(positions, jnp.maximum(boi_slot, 0),
                                     axis=1)
  carried = jnp.where(start_slot >= 0, -1, last_boi[:, None])
  boi = jnp.where(in_chunk, boi_in_chunk, carried)  # [B, T]
  span = jnp.where((boi >= 0) & (positions > boi), positions - boi - 1, -1)
  return span, boi[:, -1]


class InterleavedLM(nn.Module):
  """tokens [B, T] over the joint vocabulary -> next-token logits [B, T, V]."""
  vocab_size: int
  max_len: int
  embed_dim: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  num_layers: int
  boi_id: int = 3
  image_length: int = 0  # h * w tokens per image; needed for '2d'
  end_of_image: bool = False  # spans of up to image_length codes (LaVIT)
  image_positions: str = "1d"  # "1d": RoPE only; "2d": + row/col tables
  qk_norm: bool = False
  mlp_activation: str = "gelu"
  norm: str = "rmsnorm"
  dropout_rate: float = 0.0
  scan_layers: bool = True
  remat_policy: str = "none"
  image_input: str = "codes"  # "codes" | "patches" | "resampler"
  patch_size: int = 4  # pixels per patch side ("patches"; rows' reads)
  read_id: int = -1  # VocabLayout.read_id (reading settings)
  newline_id: int = -1  # VocabLayout.newline_id
  num_queries: int = 16  # READ slots per image ("resampler")
  feature_length: int = 64  # encoder features per image ("resampler")
  resampler_layers: int = 2
  num_experts: int = 1  # OneLLM's routed resamplers
  image_output: str = "codes"  # "codes" | "embeddings" (Emu) | "queries"
  embedding_dim: int = 0  # width of the regressed embeddings
  image_offset: int = 0  # VocabLayout.image_offset (not "codes")
  image_codes: int = 0  # image codes in the vocabulary (not "codes")
  image_head: str = "l2"  # "l2" | "gmm" (GIVT's mixture; "embeddings")
  mixtures: int = 1  # the mixture's components (image_head "gmm")
  dtype: str = "float32"
  param_dtype: str = "float32"

  def setup(self):
    if self.image_input not in image_input_lib.IMAGE_INPUTS:
      raise ValueError(
          f"image_input={self.image_input!r}; expected one of "
          f"{image_input_lib.IMAGE_INPUTS} (config.model.image_input).")
    if self.image_input != "codes" and not (
        0 <= self.read_id < self.vocab_size
        and 0 <= self.newline_id < self.vocab_size):
      raise ValueError(
          f"image_input={self.image_input!r} needs read_id and newline_id "
          f"inside the vocabulary of {self.vocab_size}; got "
          f"{self.read_id}, {self.newline_id} (VocabLayout(..., "
          "image_input=...).read_id / newline_id).")
    if self.image_output not in IMAGE_OUTPUTS:
      raise ValueError(
          f"image_output={self.image_output!r}; expected one of "
          f"{IMAGE_OUTPUTS} (config.model.image_output).")
    if self.image_output != "codes" and not (
        self.embedding_dim > 0 and self.image_codes > 0
        and 0 < self.image_offset
        and self.image_offset + self.image_codes <= self.vocab_size
        and self.image_length > 0):
      raise ValueError(
          f"image_output={self.image_output!r} needs embedding_dim > 0, "
          "image_length "
          f"> 0 and image codes inside the vocabulary of {self.vocab_size}; "
          f"got embedding_dim={self.embedding_dim}, image_length="
          f"{self.image_length}, image_offset={self.image_offset}, "
          f"image_codes={self.image_codes} (config.model; the config sets "
          "them from VocabLayout and the tokenizer).")
    if self.image_output == "queries" and (
        self.image_input == "codes" or self.image_head != "l2"):
      raise ValueError(
          f"image_output='queries' with image_input={self.image_input!r}, "
          f"image_head={self.image_head!r}: written spans hold learned "
          "queries, not the image, so given images must be read by a "
          "reading setting (config.model.image_input 'patches' or "
          "'resampler'), and the projector regresses one vector per slot "
          "(config.model.image_head 'l2').")
    if self.image_head not in IMAGE_HEADS or self.mixtures < 1:
      raise ValueError(
          f"image_head={self.image_head!r}, mixtures={self.mixtures}; "
          f"expected one of {IMAGE_HEADS} and mixtures >= 1 "
          "(config.model.image_head / mixtures).")
    if self.image_positions not in ("1d", "2d"):
      raise ValueError(
          f"image_positions must be '1d' or '2d', got "
          f"{self.image_positions!r} (config.model.image_positions).")
    if self.end_of_image and (self.image_positions != "1d"
                              or self.image_output != "codes"
                              or self.image_length <= 0):
      raise ValueError(
          "end_of_image=True (variable-length image spans) needs "
          "image_positions='1d', image_output='codes' and image_length > 0 "
          f"(the most codes per span); got {self.image_positions!r}, "
          f"{self.image_output!r}, {self.image_length} (config.model; "
          "configs/interleaved_shapes.py:dynamic=1 sets them).")
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_heads={self.num_heads} is not a multiple of num_kv_heads="
          f"{self.num_kv_heads} (config.model.num_kv_heads).")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # Tied read-out: a 1/sqrt(D) init keeps the first logits O(1).
    self.embed = unn.Embedder(self.vocab_size, self.embed_dim,
                              stddev=self.embed_dim ** -0.5, **kw)
    self.stack = unn.TransformerStack(
        num_layers=self.num_layers, embed_dim=self.embed_dim,
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads,
        head_dim=self.head_dim, mlp_dim=self.mlp_dim, causal=True,
        use_rope=True, qk_norm=self.qk_norm,
        mlp_activation=self.mlp_activation, norm=self.norm,
        dropout_rate=self.dropout_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, **kw)
    if self.image_positions == "2d":
      side = int(round(self.image_length ** 0.5))
      if side * side != self.image_length or side == 0:
        raise ValueError(
            f"image_positions='2d' needs a square image grid, got "
            f"image_length={self.image_length} (config.model.image_length).")
      self.image_rows = unn.LearnedPositions(side, self.embed_dim,
                                             self.param_dtype)
      self.image_cols = unn.LearnedPositions(side, self.embed_dim,
                                             self.param_dtype)
    if self.image_input != "codes":
      self.reader = image_input_lib.ImageReader(
          self.image_input, self.embed_dim, num_heads=self.num_heads,
          mlp_dim=self.mlp_dim, num_queries=self.num_queries,
          feature_length=self.feature_length,
          resampler_layers=self.resampler_layers,
          num_experts=self.num_experts, norm=self.norm, **kw)
    if self.image_output != "codes":
      # Frozen: the optimizer leaves parameters named frozen_* alone
      # (unimm.train.optim.frozen_mask) and the model reads it through
      # stop_gradient; the task copies the tokenizer's vectors in.
      self.frozen_image_table = self.param(
          "frozen_image_table",
          unn.partitioned(nn.initializers.normal(1.0), (None, None)),
          (self.image_codes, self.embedding_dim),
          jnp.dtype(self.param_dtype))
    if self.image_output == "embeddings":
      self.image_in = unn.dense(self.embed_dim, ("patch", "embed"),
                                use_bias=True, **kw)
    if self.image_output == "queries":
      self.image_queries = self.param(
          "image_queries",
          unn.partitioned(nn.initializers.normal(0.02), (None, "embed")),
          (self.image_length, self.embed_dim), jnp.dtype(self.param_dtype))
      self.image_proj = unn.dense(self.embed_dim, ("embed", "mlp"),
                                  use_bias=True, **kw)
    if self.image_output != "codes":
      self.image_out = unn.dense(self.head_width, ("embed", "patch"),
                                 use_bias=True, **kw)

  @property
  def head_width(self) -> int:
    """The regression head's outputs: one vector ("l2"), or per mixture
    component a logit, a mean and a scale ("gmm")."""
    if self.image_head == "gmm":
      return self.mixtures * (1 + 2 * self.embedding_dim)
    return self.embedding_dim

  def is_code(self, tokens):
    """bool: which ids are image codes."""
    return (tokens >= self.image_offset) & (
        tokens < self.image_offset + self.image_codes)

  def code_embeddings(self, tokens):
    """The frozen table's row of each code id (any other id: row 0)."""
    index = jnp.clip(tokens - self.image_offset, 0, self.image_codes - 1)
    table = jax.lax.stop_gradient(self.frozen_image_table)
    return jnp.take(table, index, axis=0)

  def nearest_codes(self, embeddings):
    """embeddings [..., E] -> the ids of their nearest table rows (l2)."""
    table = jax.lax.stop_gradient(self.frozen_image_table).astype(
        jnp.float32)
    e = embeddings.astype(jnp.float32)
    score = 2.0 * e @ table.T - jnp.sum(table * table, axis=-1)
    return (jnp.argmax(score, axis=-1) + self.image_offset).astype(jnp.int32)

  def _embed(self, tokens, span_index, reads=None, embeddings=None):
    x = self.embed.encode(tokens)  # [B, T, D]
    if self.image_output == "queries":
      # Every code slot is written: it reads its slot's learned query.
      written = self.is_code(tokens) & (span_index >= 0) & (
          span_index < self.image_length)
      queries = jnp.take(self.image_queries.astype(x.dtype),
                         jnp.clip(span_index, 0, self.image_length - 1),
                         axis=0)
      x = jnp.where(written[..., None], queries, x)
    if self.image_output == "embeddings":
      # Code slots read continuous embeddings: given ones (generation
      # feeds back what it regressed) or the codes' table rows.
      if embeddings is None:
        embeddings = self.code_embeddings(tokens)
      x = jnp.where(self.is_code(tokens)[..., None],
                    self.image_in(embeddings.astype(x.dtype)), x)
    if self.image_input != "codes" and reads is not None:
      x = image_input_lib.place_reads(x, tokens, self.reader(reads),
                                      self.read_id)
    if self.image_positions == "2d":
      side = int(round(self.image_length ** 0.5))
      inside = (span_index >= 0) & (span_index < self.image_length)
      if self.image_input != "codes":  # READ spans have no 2-D places
        inside &= (tokens != self.read_id) & (tokens != self.newline_id)
      index = jnp.where(inside, span_index, 0)
      with_2d = self.image_cols(self.image_rows(x, index // side),
                                index % side)
      x = jnp.where(inside[..., None], with_2d, x)
    return x

  def __call__(self, tokens, segment_ids=None, positions=None,
               deterministic=True, reads=None, regress=False,
               embeddings=None):
    """Teacher forcing over packed rows.

    tokens [B, T]; segment_ids [B, T] (one id per document, 0 = padding;
    default: PAD tokens are 0, others 1); positions [B, T] (restarting per
    document; default arange); reads [B, R, F]: what the row's READ slots
    read, in order (reading settings; module doc). Returns logits
    [B, T, V]: position t predicts token t + 1. image_output
    "embeddings": code slots read embeddings [B, T, E] where given (else
    their table rows), and with regress the result is (logits, the
    regressed next embedding [B, T, E]); "queries": with regress, (logits,
    the projector's output [B, T, E]), which at a code slot is that slot's
    own code vector, not the next one.
    """
    b, t = tokens.shape
    if segment_ids is None:
      segment_ids = (tokens != PAD_ID).astype(jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    span, _ = image_span_index(tokens, positions, self.boi_id)
    x = self._embed(tokens, span, reads, embeddings)
    x = self.stack(x, segment_ids=segment_ids, positions=positions,
                   deterministic=deterministic)
    if regress:
      return self.embed.decode(x), self._regressed(x)
    if self.image_output != "codes" and self.is_initializing():
      self._regressed(x)  # init creates the regression head too
    return self.embed.decode(x)  # [B, T, V]

  def _regressed(self, x):
    if self.image_output == "codes":
      raise ValueError("regress=True / decode_regress / decode_queries need "
                       "image_output 'embeddings' or 'queries'; this model "
                       "writes codes.")
    if self.image_output == "queries":  # the projector's hidden layer
      x = nn.gelu(self.image_proj(x))
    return self.image_out(x).astype(jnp.float32)

  # ------------------------------------------------------------ decoding

  def init_cache(self, batch_size: int, max_len: int | None = None) -> dict:
    """Zeroed cache: k, v [L, B, K, S, H]; valid [B, S] (slots holding real
    tokens); length [B] (real tokens so far = the next position); last_boi
    [B] (position of the latest begin-of-image, -1 if none)."""
    s = max_len or self.max_len
    cache = unn.init_cache(self.num_layers, batch_size, s, self.num_kv_heads,
                           self.head_dim, self.dtype)
    return dict(cache, valid=jnp.zeros((batch_size, s), bool),
                length=jnp.zeros((batch_size,), jnp.int32),
                last_boi=jnp.full((batch_size,), -1, jnp.int32))

  def decode_step(self, tokens, cache, slot, reads=None):
    """Feeds tokens [B, T] into cache slots slot..slot+T-1.

    PAD tokens fill a slot without being seen or advancing the position
    (left padding; rows idling while others decode). Returns (logits
    [B, V] after the last token, cache). T > 1 is the prefill; reads
    [B, R, F] are what the READ slots among these tokens read (the READ
    slots of a call count from 0).
    """
    x, cache = self._decode(tokens, cache, slot, cache["length"], reads)
    return self.embed.decode(x[:, -1:])[:, 0], cache  # [B, V]

  def decode_regress(self, tokens, embeddings, cache, slot):
    """decode_step that also regresses (image_output "embeddings"): code
    slots among tokens [B, T] read embeddings [B, T, E] (what generation
    regressed) instead of their table rows. Returns (logits [B, V], the
    head's output for the next embedding [B, head_width], cache)."""
    x, cache = self._decode(tokens, cache, slot, cache["length"],
                            embeddings=embeddings)
    return (self.embed.decode(x[:, -1:])[:, 0],
            self._regressed(x[:, -1]), cache)

  def decode_queries(self, tokens, cache, slot):
    """decode_step that projects every slot (image_output "queries"):
    tokens [B, T] into slots slot..slot+T-1 -> (the projector's output
    [B, T, E], cache); at the code slots of a written span that is the
    span's condition."""
    x, cache = self._decode(tokens, cache, slot, cache["length"])
    return self._regressed(x), cache

  def decode_window(self, tokens, cache, slot):
    """decode_step's logits after every token: tokens [B, T] into slots
    slot..slot+T-1 -> (logits [B, T, V], cache).

    Positions count the valid slots before `slot`, not cache["length"], so
    a window may be fed again from any slot (speculative decoding inside an
    image span): slots from `slot` on are overwritten. The re-fed slots
    must hold no BOI (last_boi is carried, not recomputed).
    """
    slot = jnp.asarray(slot, jnp.int32)
    before = jnp.arange(cache["valid"].shape[1]) < slot  # [S]
    length = jnp.sum(cache["valid"] & before, axis=1).astype(jnp.int32)
    x, cache = self._decode(tokens, cache, slot, length)
    return self.embed.decode(x), cache  # [B, T, V]

  def _decode(self, tokens, cache, slot, length, reads=None,
              embeddings=None):
    """tokens [B, T] at slots slot.., positions from length [B] on ->
    (the stack's output [B, T, D], cache)."""
    slot = jnp.asarray(slot, jnp.int32)
    real = tokens != PAD_ID  # [B, T]
    positions = length[:, None] + jnp.cumsum(real, axis=1) - 1
    positions = jnp.maximum(positions, 0).astype(jnp.int32)
    valid = jax.lax.dynamic_update_slice(cache["valid"], real, (0, slot))
    span, last_boi = image_span_index(tokens, positions, self.boi_id,
                                      cache["last_boi"])
    x = self._embed(tokens, span, reads, embeddings)
    layers = {k: cache[k] for k in ("k", "v")}
    x, layers = self.stack(x, segment_ids=real.astype(jnp.int32),
                           positions=positions, cache=layers,
                           cache_index=slot, cache_valid=valid)
    return x, dict(layers, valid=valid, length=length + real.sum(axis=1),
                   last_boi=last_boi)


def split_mixture(raw, mixtures: int):
  """The "gmm" head's output [..., K * (1 + 2E)] -> (logits [..., K],
  means [..., K, E], scales [..., K, E] >= MIN_SCALE)."""
  k = mixtures
  logits, rest = raw[..., :k], raw[..., k:]
  rest = rest.reshape(*rest.shape[:-1], k, 2, -1)
  scales = jax.nn.softplus(rest[..., 1, :]) + MIN_SCALE
  return logits, rest[..., 0, :], scales


def mixture_nll(raw, targets, mixtures: int):
  """-log p(targets [..., E]) under the mixture of raw [..., head_width],
  per dimension (divided by E): [...]."""
  logits, means, scales = split_mixture(raw, mixtures)
  z = (targets[..., None, :] - means) / scales
  log_normal = jnp.sum(-0.5 * z * z - jnp.log(scales)
                       - 0.5 * jnp.log(2 * jnp.pi), axis=-1)  # [..., K]
  log_p = jax.nn.logsumexp(jax.nn.log_softmax(logits) + log_normal, axis=-1)
  return -log_p / targets.shape[-1]


def mixture_mode(raw, mixtures: int):
  """The likeliest component's mean [..., E] (for nearest-code accuracy)."""
  logits, means, _ = split_mixture(raw, mixtures)
  pick = jnp.argmax(logits, axis=-1)
  return jnp.take_along_axis(means, pick[..., None, None], axis=-2)[..., 0, :]


def sample_mixture(rng, raw, mixtures: int, temperature: float,
                   guide_logits=None):
  """A draw from the mixture raw [B, head_width]: a component by its
  logits (or guide_logits, e.g. guided ones) at `temperature` (0: the
  likeliest), then its mean plus its scale times temperature times unit
  noise. Returns [B, E]."""
  logits, means, scales = split_mixture(raw, mixtures)
  if guide_logits is not None:
    logits = guide_logits
  pick_rng, noise_rng = jax.random.split(rng)
  if temperature > 0:
    pick = jax.random.categorical(pick_rng, logits / temperature, axis=-1)
  else:
    pick = jnp.argmax(logits, axis=-1)
  mean = jnp.take_along_axis(means, pick[:, None, None], axis=1)[:, 0]
  scale = jnp.take_along_axis(scales, pick[:, None, None], axis=1)[:, 0]
  return mean + temperature * scale * jax.random.normal(noise_rng,
                                                        mean.shape)


def token_logprobs(logits, targets):
  """log p(targets [...]) under logits [..., V] (a float32 log-softmax)."""
  logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]


@functools.lru_cache(maxsize=4)
def _jitted_logprob(model: "InterleavedLM"):
  def logprob(params, tokens, target_mask, reads):
    logits = model.apply(params, tokens, reads=reads)[:, :-1]
    lp = token_logprobs(logits, tokens[:, 1:])
    return jnp.sum(jnp.where(target_mask[:, 1:], lp, 0.0), axis=1)
  return jax.jit(logprob)


def sequence_logprob(model: "InterleavedLM", params, tokens, target_mask,
                     reads=None):
  """Teacher-forced log-probability of documents: tokens int32 [B, T],
  each row one document from BOS, right-padded with PAD; target_mask bool
  [B, T], the tokens to score (each given all before it); reads [B, R, F]:
  what each row's READ slots read (reading settings). Returns float [B]:
  the sum of their log-probabilities (full vocabulary)."""
  tokens = np.asarray(tokens, np.int32)
  target_mask = np.asarray(target_mask, bool)
  if tokens.shape != target_mask.shape or tokens.ndim != 2:
    raise ValueError(f"tokens {tokens.shape} and target_mask "
                     f"{target_mask.shape}; expected the same [B, T].")
  if tokens.shape[1] > model.max_len:
    raise ValueError(
        f"Documents of {tokens.shape[1]} tokens exceed the model's context "
        f"of {model.max_len} (config.model.max_len); shorten them.")
  # Right-pad to a multiple of 32 where it fits: fewer shapes to compile.
  extra = min(-tokens.shape[1] % 32, model.max_len - tokens.shape[1])
  pad = ((0, 0), (0, extra))
  return np.asarray(_jitted_logprob(model)(
      params, np.pad(tokens, pad), np.pad(target_mask, pad), reads))


def reorder_cache(cache: dict, rows) -> dict:
  """The cache's rows [R] gathered (beam search): k, v hold the batch on
  axis 1 ([L, B, K, S, H]), the rest on axis 0."""
  return {name: jnp.take(value, rows, axis=1 if name in ("k", "v") else 0)
          for name, value in cache.items()}


# ---------------------------------------------------------------- sampling


def _step_fn(model: "InterleavedLM"):
  """The sampler's step (unimm.sampling.sampler.StepFn) for this model;
  the prefill also passes reads (what its READ slots read)."""
  def step(params, cache, tokens, slot, reads=None):
    return model.apply(params, tokens, cache, slot, reads,
                       method=InterleavedLM.decode_step)
  return step


def _window_step_fn(model: "InterleavedLM"):
  """The sampler's window step (sampler.WindowStepFn) for this model."""
  def window_step(params, cache, tokens, slot):
    return model.apply(params, tokens, cache, slot,
                       method=InterleavedLM.decode_window)
  return window_step


@functools.lru_cache(maxsize=16)
def _jitted_phases(model: "InterleavedLM", text_sampling, image_sampling,
                   max_text_tokens: int, stop_ids, text_allowed, image_allowed,
                   pad_id: int, drop_ids, eoi_id: int):
  """The compiled pieces of continue_documents (one program each), cached
  per model, sampling settings and vocabulary masks (tuples of bools).

  With guidance or CD-K (image_sampling.doubled) the cache holds 2B rows,
  [cond; uncond]: the unconditional half is fed the same tokens with text
  turned into PAD (invisible, no position), i.e. the document with its
  text dropped, as trained (config.loss.drop_text_rate). Text phases sample
  from the conditional half only; image phases score tokens from both
  halves' logits (guidance's mix, or CD-K with the text-dropped document
  as the amateur). With image_sampling.sjd_window, image spans decode by
  speculative Jacobi decoding (sampler.sjd_decode). The image phase also
  returns its model calls, and for image_output "embeddings" / "queries"
  the regressed embeddings [B, K, E] (its codes are their nearest table
  rows). With model.end_of_image the image phase runs until each row
  writes eoi_id (image_allowed holds it), at most image_length steps; its
  model calls are then also the cache slots it used, and the codes it
  returns are PAD from a row's EOI on.
  """
  doubled = image_sampling.doubled
  text_allowed, image_allowed, drop_ids = (
      jnp.asarray(m, bool) for m in (text_allowed, image_allowed, drop_ids))

  step = _step_fn(model)

  def both(tokens):  # [B, T] -> [2B, T] (cond; text dropped) when doubled
    if not doubled:
      return tokens
    return jnp.concatenate(
        [tokens, jnp.where(drop_ids[tokens], pad_id, tokens)], axis=0)

  def text_step(params, cache, tokens, slot):
    logits, cache = step(params, cache, both(tokens), slot)
    return logits[:tokens.shape[0]], cache

  def prefill(params, cache, tokens, reads):
    if doubled and reads is not None:  # the text-dropped half sees images
      reads = jnp.concatenate([reads, reads], axis=0)
    return step(params, cache, both(tokens), 0, reads)[1]

  def text(params, cache, first, slot, rng, done):
    out, lengths, cache, steps = samp.while_decode(
        text_step, params, cache, first, slot, max_text_tokens, rng,
        text_sampling, stop_ids, allowed=text_allowed, pad_id=pad_id,
        done=done)
    return out, lengths, cache, steps

  def regressed_image(params, cache, first, slot, rng, active):
    """Emu's image span: each step feeds the last regressed embedding
    (BOI first) and regresses the next. Guidance extrapolates the
    conditional output from the text-dropped one, as for logits: the
    vector ("l2"), or the mixture's component logits ("gmm", sampled at
    image_sampling.temperature; means and scales are the conditional
    ones)."""
    b = first.shape[0]
    width = model.embedding_dim
    gmm = model.image_head == "gmm"

    def feed(cache, tokens, embeddings, at, rng):
      tokens = jnp.where(active, tokens, pad_id)[:, None]
      embeddings = embeddings[:, None]
      if doubled:
        embeddings = jnp.concatenate([embeddings, embeddings], axis=0)
      _, raw, cache = model.apply(
          params, both(tokens), embeddings, cache, at,
          method=InterleavedLM.decode_regress)
      guided = None
      if doubled:
        guided = samp.guided_logits(raw, image_sampling.cfg_scale)
        raw = raw[:b]
      if gmm:
        out = sample_mixture(
            rng, raw, model.mixtures, image_sampling.temperature,
            None if guided is None else guided[:, :model.mixtures])
      else:
        out = raw if guided is None else guided
      return cache, jnp.where(active[:, None], out, 0.0)

    def body(carry, xs):
      cache, tokens, embeddings = carry
      i, key = xs
      cache, regressed = feed(cache, tokens, embeddings, slot + i, key)
      code = jnp.full((b,), model.image_offset, jnp.int32)
      return (cache, code, regressed), regressed

    start = (cache, first, jnp.zeros((b, width), jnp.float32))
    (cache, tokens, last), regressed = jax.lax.scan(
        body, start, (jnp.arange(model.image_length),
                      jax.random.split(rng, model.image_length)))
    # Feed the last embedding: the text phase that follows feeds EOI.
    cache, _ = feed(cache, tokens, last, slot + model.image_length, rng)
    regressed = jnp.moveaxis(regressed, 0, 1)  # [B, K, E]
    codes = model.apply(params, regressed,
                        method=InterleavedLM.nearest_codes)
    return (jnp.where(active[:, None], codes, pad_id), cache,
            jnp.int32(model.image_length), regressed)

  def queried_image(params, cache, first, slot, rng, active):
    """The output-query image span: BOI and image_length query slots fed
    in one call, their projections guided like logits (the code ids fed
    are placeholders: written slots read their queries)."""
    del rng  # the span is a deterministic function of the document
    b, length = first.shape[0], model.image_length
    tokens = jnp.concatenate(
        [first[:, None], jnp.full((b, length), model.image_offset)], axis=1)
    tokens = jnp.where(active[:, None], tokens, pad_id).astype(jnp.int32)
    projected, cache = model.apply(params, both(tokens), cache, slot,
                                   method=InterleavedLM.decode_queries)
    projected = projected[:, 1:]  # [B or 2B, K, E]
    if doubled:
      projected = samp.guided_logits(projected, image_sampling.cfg_scale)
    projected = jnp.where(active[:, None, None], projected, 0.0)
    codes = model.apply(params, projected,
                        method=InterleavedLM.nearest_codes)
    return (jnp.where(active[:, None], codes, pad_id), cache, jnp.int32(1),
            projected)

  def ended_image(params, cache, first, slot, rng, active):
    """A variable-length span: codes until the row writes EOI (emitted,
    not fed: the text phase feeds it), then PAD."""
    codes, _, cache, steps = samp.while_decode(
        step, params, cache, first, slot, model.image_length, rng,
        image_sampling, stop_tokens=[eoi_id], allowed=image_allowed,
        pad_id=pad_id, done=~active)
    codes = jnp.where(codes == eoi_id, pad_id, codes)
    # A row that wrote image_length codes without EOI feeds its last one
    # (the others feed PAD, which changes nothing).
    _, cache = step(params, cache, both(codes[:, -1:]), slot + steps)
    return codes, cache, steps, None

  def image(params, cache, first, slot, rng, active):
    if model.image_output == "queries":
      return queried_image(params, cache, first, slot, rng, active)
    if model.image_output == "embeddings":
      return regressed_image(params, cache, first, slot, rng, active)
    if model.end_of_image:
      return ended_image(params, cache, first, slot, rng, active)
    if image_sampling.sjd_window and model.image_length > 1:
      codes, cache, calls = samp.sjd_decode(
          _window_step_fn(model), params, cache, first, slot,
          model.image_length, rng, image_sampling, allowed=image_allowed,
          active=active, pad_id=pad_id)
    else:
      codes, cache = samp.scan_decode(
          step, params, cache, first, slot, model.image_length, rng,
          image_sampling, allowed=image_allowed, active=active,
          pad_id=pad_id)
      calls = jnp.int32(model.image_length)
    # Feed the last code: the text phase that follows feeds the forced EOI.
    last = jnp.where(active, codes[:, -1], pad_id)[:, None]
    _, cache = step(params, cache, both(last), slot + model.image_length)
    return codes, cache, calls, None

  return (jax.jit(prefill), jax.jit(text), jax.jit(image))


def continue_documents(model: "InterleavedLM", params, prompts, rng, *,
                       text_ids, image_ids, eos_id: int, boi_id: int,
                       eoi_id: int, text_sampling, image_sampling,
                       max_new_tokens: int, max_text_tokens: int = 64,
                       max_images: int = 4, drop_ids=None,
                       return_image_steps: bool = False, reads=None,
                       return_embeddings: bool = False):
  """Continues each prompt row until EOS (or a budget), mixing modalities.

  prompts int32 [B, P], left-padded with PAD; a prompt ending in BOI starts
  with an image. The model writes text (ids restricted to text_ids, BOI and
  EOS) until it emits BOI; then exactly (with model.end_of_image: at most,
  until it writes EOI; PAD after)
  model.image_length image tokens restricted to image_ids, decoded by one
  lax.scan of the shared sampler (or, with image_sampling.sjd_window, by
  speculative Jacobi decoding: the same distribution in fewer model calls);
  then EOI is forced and text resumes. Rows
  that finished idle on PAD (which the model ignores) while others go on.
  Each phase is one compiled program over the preallocated cache. A row
  stops at EOS, after max_text_tokens of text without BOI or EOS, or when
  it asks for more than max_images images; the batch stops once
  max_new_tokens are made. image_sampling.cfg_scale guides image spans
  by the same document with its text dropped, and
  image_sampling.contrastive_alpha decodes them by CD-K against that
  document (see _jitted_phases); text is sampled with text_sampling (no
  guidance, no CD-K).

  text_ids / image_ids: bool [V] masks of the two vocabularies (text_ids:
  the pieces the model may write). drop_ids: bool [V], the ids the
  unconditional half drops (default text_ids; all text pieces). Returns
  int32 [B, N] new tokens (PAD after a row's EOS; N <= max_new_tokens +
  the last phase's overshoot); with return_image_steps, also the model
  calls of each image phase (a list of ints; image_length each without
  SJD). reads [B, R, F]: what the prompts' READ slots read (reading
  settings; READ slots sit in the prompts only). For image_output
  "embeddings" (Emu) image spans are regressed: guidance applies,
  temperature only to a mixture head ("gmm"), and CD-K and SJD are
  errors; the codes
  returned are the nearest table rows, and with return_embeddings the
  regressed embeddings of each image phase come last (a list of float
  [B, image_length, E], zeros for rows that drew no image). For
  "queries" (NExT-GPT / SEED-X) each image span is one model call over its
  learned queries, guided alike, with no sampling at all.
  """
  if model.image_output != "codes" and (
      image_sampling.contrastive_alpha is not None
      or image_sampling.sjd_window):
    raise ValueError(
        f"contrastive_alpha={image_sampling.contrastive_alpha}, sjd_window="
        f"{image_sampling.sjd_window}: this model regresses image embeddings "
        f"(image_output={model.image_output!r}), which have no token "
        "distribution to "
        "contrast or speculate on; leave both off (cfg_scale guides it).")
  if return_embeddings and model.image_output == "codes":
    raise ValueError("return_embeddings needs a model with image_output "
                     "'embeddings' or 'queries'; this one writes codes.")
  if model.end_of_image and image_sampling.sjd_window:
    raise ValueError(
        f"sjd_window={image_sampling.sjd_window}: speculative Jacobi "
        "decoding drafts fixed-length image spans, and this model's end at "
        "an EOI it writes (config.model.end_of_image); set sjd_window=0.")
  if text_sampling.sjd_window:
    raise ValueError(
        f"text_sampling has sjd_window={text_sampling.sjd_window}: "
        "speculative Jacobi decoding applies to image spans only; pass it in "
        "image_sampling and leave text_sampling.sjd_window 0.")
  image_sampling.check_sjd_window()
  if text_sampling.doubled:
    raise ValueError(
        f"text_sampling has cfg_scale={text_sampling.cfg_scale}, "
        f"contrastive_alpha={text_sampling.contrastive_alpha}: guidance and "
        "CD-K apply to image spans only; pass them in image_sampling and "
        "leave both None in text_sampling.")
  prompts = np.asarray(prompts, np.int32)
  room = max_new_tokens + max_text_tokens + model.image_length + 2
  # Left-pad (PAD is invisible) to a multiple of 16 where it fits: fewer
  # distinct shapes to compile across calls.
  extra = min(-prompts.shape[1] % 16,
              max(model.max_len - room - prompts.shape[1], 0))
  prompts = np.pad(prompts, ((0, 0), (extra, 0)))
  b, p = prompts.shape
  text_allowed = np.asarray(text_ids, bool).copy()
  text_allowed[[boi_id, eos_id]] = True
  image_allowed = np.asarray(image_ids, bool).copy()
  image_allowed[eoi_id] = model.end_of_image  # it ends its spans itself
  drop_ids = text_ids if drop_ids is None else drop_ids
  as_key = lambda mask: tuple(np.asarray(mask, bool).tolist())  # noqa: E731
  capacity = p + room
  if capacity > model.max_len:
    raise ValueError(
        f"Prompt ({p} tokens) + max_new_tokens ({max_new_tokens}) + one more "
        f"phase needs {capacity} cache slots but the model's context is "
        f"{model.max_len} (config.model.max_len); shorten the document or "
        "lower max_new_tokens.")
  prefill, text, image = _jitted_phases(
      model, text_sampling, image_sampling, max_text_tokens,
      (boi_id, eos_id), as_key(text_allowed), as_key(image_allowed), PAD_ID,
      as_key(drop_ids), eoi_id)
  cache = model.init_cache(2 * b if image_sampling.doubled else b, capacity)
  cache = prefill(params, cache, prompts[:, :-1],
                  None if reads is None else jnp.asarray(reads))
  # Each row's next token to feed; a prompt ending in BOI starts an image.
  first, slot = np.asarray(prompts[:, -1]), p - 1
  wants_image = first == boi_id
  done = np.zeros((b,), bool)
  pieces, made, image_steps, embeddings = [], 0, [], []
  images = np.zeros((b,), np.int32)  # per row: at most max_images each
  while True:
    rng, text_rng, image_rng = jax.random.split(rng, 3)
    done |= wants_image & (images >= max_images)
    wants_image &= images < max_images
    if wants_image.any():
      codes, cache, calls, regressed = image(
          params, cache, jnp.asarray(first), slot, image_rng,
          jnp.asarray(wants_image))
      image_steps.append(int(calls))
      if regressed is not None:
        embeddings.append(np.asarray(regressed))
      pieces.append(np.asarray(codes))
      pieces.append(np.where(wants_image, eoi_id, PAD_ID)[:, None])
      # The slots the phase used: its steps and the last code's feed.
      slot += (int(calls) if model.end_of_image else model.image_length) + 1
      made += model.image_length + 1
      images += wants_image
      # EOI is forced; rows that did not draw idle and keep their token.
      first = np.where(wants_image, eoi_id, first)
      wants_image = np.zeros((b,), bool)
    if done.all() or made >= max_new_tokens:
      break
    out, lengths, cache, steps = text(params, cache, jnp.asarray(first), slot,
                                      text_rng, jnp.asarray(done))
    steps = int(steps)
    out = np.asarray(out)[:, :steps]
    pieces.append(out)
    made += steps
    slot += steps
    lengths = np.asarray(lengths)
    last = out[np.arange(b), np.maximum(lengths - 1, 0)] if steps else (
        np.full((b,), PAD_ID))
    wants_image = ~done & (lengths > 0) & (last == boi_id)
    done |= ~wants_image  # EOS, or this phase's text budget ran out
    first = np.where(wants_image, boi_id, PAD_ID)
    if not wants_image.any():
      break
  out = np.concatenate(pieces, axis=1).astype(np.int32)
  extra = ([image_steps] if return_image_steps else []) + (
      [embeddings] if return_embeddings else [])
  return tuple([out] + extra) if extra else out


@functools.lru_cache(maxsize=8)
def _jitted_beam(model: "InterleavedLM", beam_size: int, max_tokens: int,
                 stop_ids, allowed, pad_id: int):
  """beam_search_text's one compiled program: prefill, then beam_decode."""
  allowed = jnp.asarray(allowed, bool)
  step = _step_fn(model)

  def search(params, cache, prompts, reads):
    # Prefill each prompt once, then copy its cache row to its beams.
    cache = step(params, cache, prompts[:, :-1], 0, reads)[1]
    rows = jnp.repeat(jnp.arange(prompts.shape[0]), beam_size)
    return samp.beam_decode(step, params, reorder_cache(cache, rows),
                            prompts[rows, -1],
                            prompts.shape[1] - 1, max_tokens, beam_size,
                            stop_ids, reorder_cache, allowed=allowed,
                            pad_id=pad_id)

  return jax.jit(search)


def beam_search_text(model: "InterleavedLM", params, prompts, *, text_ids,
                     eos_id: int, beam_size: int, max_text_tokens: int = 64,
                     reads=None):
  """The likeliest text continuation of each prompt row by beam search
  (unimm.sampling.sampler.beam_decode, the same step and cache as
  continue_documents): text ids from text_ids until EOS. prompts int32
  [B, P], left-padded with PAD. Returns (int32 [B, beam_size, N] new
  tokens, EOS included and PAD after it, as continue_documents gives
  them; float [B, beam_size] their summed log-probabilities): each row's
  final beams, best first. A beam that never scored (a search with fewer
  live continuations than beams) has score -inf. reads: as for
  continue_documents.
  """
  if not (isinstance(beam_size, int) and beam_size >= 1):
    raise ValueError(f"beam_size={beam_size!r}; expected an int >= 1.")
  prompts = np.asarray(prompts, np.int32)
  capacity = prompts.shape[1] + max_text_tokens
  if capacity > model.max_len:
    raise ValueError(
        f"Prompt ({prompts.shape[1]} tokens) + max_text_tokens "
        f"({max_text_tokens}) needs {capacity} cache slots but the model's "
        f"context is {model.max_len} (config.model.max_len); shorten the "
        "document or lower max_text_tokens.")
  allowed = np.asarray(text_ids, bool).copy()
  allowed[eos_id] = True
  search = _jitted_beam(model, beam_size, max_text_tokens, (eos_id,),
                        tuple(allowed.tolist()), PAD_ID)
  cache = model.init_cache(prompts.shape[0], capacity)
  out, scores, steps = search(params, cache, jnp.asarray(prompts),
                              None if reads is None else jnp.asarray(reads))
  out = np.asarray(out)[:, :, :max(int(steps), 1)]
  return out.astype(np.int32), np.asarray(scores)
