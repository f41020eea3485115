"""ViT-VQGAN image tokenizer (Yu et al. 2021, "Vector-quantized Image
Modeling with Improved VQGAN").

Encoder (§3.1): p x p patches -> linear embed -> learned positions -> ViT
-> a feed-forward head with tanh, whose output layer is the factorized
quantizer's linear map to the code dim (§3.2). Decoder: codes -> linear map
to the decoder width -> learned positions -> ViT -> tanh feed-forward ->
per-patch linear map to 2 C outputs per pixel: the logit-Laplace location mu
and log-scale ln b (DALL-E appendix A.3). The reconstruction is the
distribution's location mapped back to [0, 1].

Pixels enter as uint8 [B, H, W, C] (or floats in [0, 1]) and are scaled to
[-1, 1] inside.

With num_queries = K > 0 the tokens are SEED's 1-D causal sequence (Ge et
al. 2023, arXiv 2307.08041) instead of the patch grid: K learned queries
go through a causal Q-Former (self-attention among the queries, causal, so
query k never sees a later one; cross-attention to the ViT encoder's patch
tokens) into the same head and quantizer, so an image is K ids [B, 1, K]
with a left-to-right dependency. The decoder's patch slots (learned
positions) cross-attend to the K quantized tokens (plus learned 1-D
positions) through a bidirectional ViT, and the same per-patch head draws
the image. Everything else (losses, trainer, checkpoints,
load_tokenizer) is unchanged; `grid` is (1, K), `patch_grid` the pixels'.

With keep_ratio > 0 the tokens are LaVIT's dynamic ones (Jin et al. 2023,
arXiv 2309.04669; unimm.tokenizers.dynamic): a selector keeps the
informative patches, a causal merger folds the dropped ones into the kept,
and only the kept tokens are quantized, in raster order, at the front of
a static row: ids [B, 1, N] (N = the patches) whose empty slots are -1, so
an image's length is (ids >= 0).sum(). The decoder reads them as SEED's
(by default its patch slots cross-attend to the valid tokens;
token_decoder="joint" puts tokens and slots in one stack). The forward
pass adds losses["keep"], (keep_ratio - the batch's kept fraction)^2, and
losses["keep_per_image"], that penalty per image, averaged.

With teacher_codes = C > 0 (SEED or LaVIT only) the decoder does not draw
pixels: its patch slots predict the ids of a frozen grid ViT-VQGAN of the
same sizes with C codes (the "frozen_teacher" submodule, whose params the
task loads from config.teacher_workdir), trained by cross-entropy against
the teacher's own encoding of the image, and the teacher's decoder draws
the argmax ids. This is how SEED and LaVIT themselves decode: their tokens
are trained to reconstruct a frozen model's features, and a frozen image
generator (Stable Diffusion there, the grid tokenizer's decoder here) turns
those into pixels. The forward pass adds teacher_logits [B, P, C] and
teacher_ids [B, P]; no gradient reaches the teacher. read_teacher_encoder
makes the Q-Former (LaVIT: the selector and merger) read the teacher's
frozen encoder tokens instead of an encoder of its own.
"""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm import nn as unn
from unimm.tokenizers import dynamic
from unimm.tokenizers import losses as losses_lib
from unimm.tokenizers.quantizer import FactorizedQuantizer

# ViT-VQGAN Table 1 / appendix: transformer sizes of the encoder and decoder.
# "large" is the paper's ViT-VQGAN-LL; its best model (SL) pairs a small
# encoder with a large decoder: vit_vqgan_config("small", decoder="large").
STACK_SIZES = {
    "tiny": dict(embed_dim=64, num_layers=2, num_heads=2, mlp_dim=128),
    "small": dict(embed_dim=512, num_layers=8, num_heads=8, mlp_dim=2048),
    "base": dict(embed_dim=768, num_layers=12, num_heads=12, mlp_dim=3072),
    "large": dict(embed_dim=1280, num_layers=32, num_heads=16, mlp_dim=5120),
}
# Image and codebook settings: the paper's 256x256 images, 8x8 patches
# (32x32 tokens), 8192 codes of dim 32; tiny is for 32x32 shapes on CPU.
CODEBOOK_SIZES = {
    "tiny": dict(image_size=32, patch_size=4, num_codes=512, code_dim=16),
    "small": dict(image_size=256, patch_size=8, num_codes=8192, code_dim=32),
    "base": dict(image_size=256, patch_size=8, num_codes=8192, code_dim=32),
    "large": dict(image_size=256, patch_size=8, num_codes=8192, code_dim=32),
}
SIZES = {
    name: dict(
        **CODEBOOK_SIZES[name],
        **{f"encoder_{k}": v for k, v in STACK_SIZES[name].items()},
        **{f"decoder_{k}": v for k, v in STACK_SIZES[name].items()})
    for name in STACK_SIZES
}


def vit_vqgan_config(size: str, decoder: str | None = None, **overrides):
  """Constructor kwargs for ViTVQGAN from the size table (for config.model).

  size picks the encoder (and, unless `decoder` is given, the decoder) size;
  overrides replace any field, e.g. vit_vqgan_config("tiny", num_codes=256).
  """
  for name in (size, decoder):
    if name is not None and name not in SIZES:
      raise ValueError(f"Unknown ViT-VQGAN size {name!r}; expected one of "
                       f"{sorted(SIZES)} (config arg size=...).")
  kwargs = dict(SIZES[size])
  if decoder is not None:
    kwargs.update({f"decoder_{k}": v for k, v in STACK_SIZES[decoder].items()})
  unknown = set(overrides) - {f.name for f in _fields()}
  if unknown:
    raise ValueError(f"Unknown ViTVQGAN fields {sorted(unknown)}.")
  kwargs.update(overrides)
  return kwargs


def _fields():
  return [f for f in dataclasses.fields(ViTVQGAN)
          if f.name not in ("parent", "name")]


def validate_config(image_size: int, patch_size: int, num_codes: int,
                    code_dim: int, encoder_embed_dim: int,
                    encoder_num_heads: int, decoder_embed_dim: int,
                    decoder_num_heads: int, num_queries: int = 0,
                    query_layers: int = 2, keep_ratio: float = 0.0,
                    merger_layers: int = 2, token_decoder: str = "cross",
                    keep_at_encode: str = "likelier", teacher_codes: int = 0,
                    read_teacher_encoder: bool = False,
                    token_decoder_layers: int = 0, **unused):
  """Raises ValueError for settings that cannot build (before compiling)."""
  del unused
  if isinstance(token_decoder_layers, bool) or not isinstance(
      token_decoder_layers, int) or token_decoder_layers < 0:
    raise ValueError(
        f"config.model.token_decoder_layers={token_decoder_layers!r}; "
        "expected an int >= 0 (0: config.model.decoder_num_layers).")
  if read_teacher_encoder and not teacher_codes:
    raise ValueError(
        "config.model.read_teacher_encoder=True reads a frozen grid "
        "tokenizer's encoder, but teacher_codes=0 builds none; pass "
        "teacher=WORKDIR too (config arg teacher_encoder=1 needs it).")
  if teacher_codes and not (num_queries or keep_ratio):
    raise ValueError(
        f"config.model.teacher_codes={teacher_codes} decodes SEED's or "
        "LaVIT's tokens through a frozen grid tokenizer, but num_queries=0 "
        "and keep_ratio=0 build the grid itself; pass tokens=K or keep=R "
        "too, or drop teacher=.")
  if isinstance(teacher_codes, bool) or not isinstance(teacher_codes, int) or (
      teacher_codes < 0 or teacher_codes == 1):
    raise ValueError(
        f"config.model.teacher_codes={teacher_codes!r}; expected 0 (decode "
        "pixels) or the frozen grid tokenizer's num_codes (>= 2).")
  if keep_at_encode not in ("likelier", "sampled"):
    raise ValueError(
        f"config.model.keep_at_encode={keep_at_encode!r}; expected "
        "'likelier' or 'sampled' (config arg keep_at_encode=...).")
  if token_decoder not in ("cross", "joint"):
    raise ValueError(
        f"config.model.token_decoder={token_decoder!r}; expected 'cross' or "
        "'joint' (config arg token_decoder=...).")
  if isinstance(keep_ratio, bool) or not isinstance(
      keep_ratio, (int, float)) or not 0.0 <= keep_ratio <= 1.0:
    raise ValueError(
        f"config.model.keep_ratio={keep_ratio!r}; LaVIT's target fraction of "
        "kept patches must lie in (0, 1] (config arg keep=...; 0 = every "
        "patch, the grid).")
  if keep_ratio and num_queries:
    raise ValueError(
        f"config.model.keep_ratio={keep_ratio} (LaVIT) and num_queries="
        f"{num_queries} (SEED) are two kinds of tokens; set one of them to "
        "0 (config args keep= / tokens=).")
  if keep_ratio and merger_layers < 1:
    raise ValueError(
        f"config.model.merger_layers={merger_layers}; LaVIT's token merger "
        f"(keep_ratio={keep_ratio}) needs at least one layer.")
  if isinstance(num_queries, bool) or not isinstance(num_queries, int) or (
      num_queries < 0):
    raise ValueError(
        f"config.model.num_queries={num_queries!r}; expected an int >= 0 "
        "(SEED's 1-D tokens per image, config arg tokens=...; 0 = the "
        "patch grid).")
  if num_queries and query_layers < 1:
    raise ValueError(
        f"config.model.query_layers={query_layers}; SEED's causal Q-Former "
        f"(num_queries={num_queries}) needs at least one layer.")
  if patch_size <= 0 or image_size % patch_size:
    raise ValueError(
        f"config.model.patch_size={patch_size} does not divide "
        f"config.model.image_size={image_size}; choose a divisor (e.g. "
        f"{[p for p in (4, 8, 16) if image_size % p == 0] or [1]}).")
  for part, dim, heads in (("encoder", encoder_embed_dim, encoder_num_heads),
                           ("decoder", decoder_embed_dim, decoder_num_heads)):
    if dim % heads:
      raise ValueError(
          f"config.model.{part}_embed_dim={dim} is not divisible by "
          f"config.model.{part}_num_heads={heads}.")
  if num_codes < 2 or code_dim < 1:
    raise ValueError(f"need num_codes >= 2 and code_dim >= 1, got "
                     f"num_codes={num_codes}, code_dim={code_dim} "
                     "(config.model).")


def to_unit_interval(images):
  """uint8 [0, 255] or float [0, 1] -> float32 [0, 1]."""
  if jnp.issubdtype(images.dtype, jnp.integer):
    return images.astype(jnp.float32) / 255.0
  return images.astype(jnp.float32)


class ViTVQGAN(nn.Module):
  """ViT encoder, factorized l2-normalised quantizer, ViT decoder."""
  image_size: int
  patch_size: int
  num_codes: int
  code_dim: int
  encoder_embed_dim: int
  encoder_num_layers: int
  encoder_num_heads: int
  encoder_mlp_dim: int
  decoder_embed_dim: int
  decoder_num_layers: int
  decoder_num_heads: int
  decoder_mlp_dim: int
  channels: int = 3
  commitment_cost: float = 0.25
  dropout_rate: float = 0.0
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"
  num_queries: int = 0  # SEED: K causal 1-D tokens (0: the patch grid)
  query_layers: int = 2  # the causal Q-Former's layers (num_queries > 0)
  keep_ratio: float = 0.0  # LaVIT: target kept fraction (0: every patch)
  merger_layers: int = 2  # LaVIT's token merger layers (keep_ratio > 0)
  # LaVIT's decisions when encoding: "likelier", keep where keep is the
  # likelier; "sampled", LaVIT's Gumbel draw, from one fixed key per patch
  # slot (the same image always gets the same tokens).
  keep_at_encode: str = "likelier"
  # How the decoder reads 1-D (SEED / LaVIT) tokens: "cross", its patch
  # slots cross-attend to them; "joint", [tokens; patch slots] go through
  # one bidirectional stack (TiTok's / MAE's decoder) and the slots draw.
  token_decoder: str = "cross"
  # The depth of the decoder that reads 1-D tokens (0: decoder_num_layers).
  token_decoder_layers: int = 0
  # SEED / LaVIT: > 0, the decoder predicts the ids of a frozen grid
  # ViT-VQGAN with this many codes (same sizes) and its decoder draws them.
  teacher_codes: int = 0
  # With a teacher: the Q-Former (LaVIT: the selector and merger) reads the
  # teacher's frozen encoder tokens instead of an encoder of its own, as
  # SEED's Q-Former reads a frozen ViT.
  read_teacher_encoder: bool = False

  @property
  def patch_grid(self) -> tuple[int, int]:
    """Patches per side of the image (the encoder's and decoder's slots)."""
    n = self.image_size // self.patch_size
    return n, n

  @property
  def grid(self) -> tuple[int, int]:
    """The ids' shape per image: the patch grid, (1, K) for SEED, (1, N
    patches) for LaVIT (empty slots -1)."""
    if self.num_queries:
      return 1, self.num_queries
    if self.keep_ratio:
      return 1, self.num_patches
    return self.patch_grid

  def frozen_teacher_fields(self) -> dict:
    """The constructor fields of the frozen grid tokenizer whose codes this
    one's decoder predicts (teacher_codes > 0): this model's sizes, the
    grid, teacher_codes codes."""
    fields = {f.name: getattr(self, f.name) for f in _fields()}
    fields.update(num_codes=self.teacher_codes, num_queries=0,
                  keep_ratio=0.0, teacher_codes=0)
    for name in ("dropout_rate", "dtype", "param_dtype", "remat_policy",
                 "read_teacher_encoder", "token_decoder_layers",
                 "keep_at_encode", "token_decoder", "query_layers",
                 "merger_layers", "commitment_cost"):
      del fields[name]  # free to differ: they do not change the params
    return fields

  @property
  def codes_on_grid(self) -> bool:
    """True when id i draws patch i (the grid; not SEED's or LaVIT's)."""
    return not (self.num_queries or self.keep_ratio)

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def num_patches(self) -> int:
    return self.patch_grid[0] * self.patch_grid[1]

  def _stack(self, prefix: str, num_layers=None, causal=False,
             cross_attention=False, name=None):
    dim = getattr(self, f"{prefix}_embed_dim")
    heads = getattr(self, f"{prefix}_num_heads")
    return unn.TransformerStack(
        num_layers=num_layers or getattr(self, f"{prefix}_num_layers"),
        embed_dim=dim, num_heads=heads, num_kv_heads=heads,
        head_dim=dim // heads, mlp_dim=getattr(self, f"{prefix}_mlp_dim"),
        causal=causal, cross_attention=cross_attention,
        dropout_rate=self.dropout_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype,
        param_dtype=self.param_dtype, name=name or f"{prefix}_transformer")

  def setup(self):
    validate_config(**{f.name: getattr(self, f.name) for f in _fields()})
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    self.patch_embed = unn.PatchEmbed(self.patch_size, self.encoder_embed_dim,
                                      name="patch_embed", **kw)
    self.encoder_positions = unn.LearnedPositions(
        self.num_patches, self.encoder_embed_dim, self.param_dtype,
        name="encoder_positions")
    self.encoder = self._stack("encoder")
    seed = self.num_queries > 0
    if self.keep_ratio:
      self.selector = dynamic.TokenSelector(self.encoder_embed_dim,
                                            name="selector", **kw)
      self.merger = dynamic.TokenMerger(
          self.merger_layers, self.encoder_embed_dim, self.encoder_num_heads,
          self.encoder_mlp_dim, scan_layers=self.scan_layers,
          remat_policy=self.remat_policy, name="merger", **kw)
    if seed or self.keep_ratio:
      self.token_positions = unn.LearnedPositions(
          self.num_tokens, self.decoder_embed_dim, self.param_dtype,
          name="token_positions")
    if seed:
      self.queries = self.param(
          "queries", unn.partitioned(nn.initializers.normal(0.02),
                                     (None, "embed")),
          (self.num_queries, self.encoder_embed_dim),
          jnp.dtype(self.param_dtype))
      self.qformer = self._stack("encoder", self.query_layers, causal=True,
                                 cross_attention=True, name="qformer")
    # §3.1: the encoder output goes through a feed-forward layer with tanh;
    # its output layer is the quantizer's linear map to the code dim (§3.2).
    self.encoder_head = unn.dense(self.encoder_mlp_dim, ("embed", "mlp"),
                                  use_bias=True, name="encoder_head", **kw)
    self.quantizer = FactorizedQuantizer(
        self.num_codes, self.code_dim, self.decoder_embed_dim,
        self.commitment_cost, name="quantizer", **kw)
    self.decoder_positions = unn.LearnedPositions(
        self.num_patches, self.decoder_embed_dim, self.param_dtype,
        name="decoder_positions")
    self.decoder = self._stack(
        "decoder", (not self.codes_on_grid and self.token_decoder_layers)
        or None, cross_attention=not self.codes_on_grid and (
            self.token_decoder == "cross"))
    if self.teacher_codes:  # the slots predict a frozen grid's codes
      self.code_head = unn.dense(self.teacher_codes, ("embed", "vocab"),
                                 use_bias=True, name="code_head", **kw)
      self.frozen_teacher = ViTVQGAN(
          **self.frozen_teacher_fields(), dropout_rate=0.0, dtype=self.dtype,
          param_dtype=self.param_dtype, remat_policy=self.remat_policy,
          name="frozen_teacher")
    else:
      self.decoder_head = unn.dense(self.decoder_mlp_dim, ("embed", "mlp"),
                                    use_bias=True, name="decoder_head", **kw)
      self.patch_unembed = unn.PatchUnembed(
          self.patch_size, 2 * self.channels, name="patch_unembed", **kw)

  def encoder_tokens(self, images, deterministic: bool = True):
    """images [B, H, W, C] -> the ViT encoder's output [B, T, D_enc] (what
    the interleaved model's resampler reads, unimm.models.image_input)."""
    x = to_unit_interval(images) * 2.0 - 1.0
    x = self.patch_embed(x)  # [B, T, D_enc]
    x = self.encoder_positions(x)
    return self.encoder(x, deterministic=deterministic)

  def _teacher_tokens(self, images):
    """The frozen teacher's encoder tokens [B, P, D_enc] (no gradient)."""
    return jax.lax.stop_gradient(
        self.frozen_teacher.encoder_tokens(images, True))

  def _grid_ids(self, tokens):
    """A grid tokenizer's encoder tokens [B, P, D_enc] -> its ids [B, P]
    (what encode gives, from tokens already computed)."""
    return self.quantizer.encode(jnp.tanh(self.encoder_head(tokens)))

  def _encode(self, images, deterministic, teacher_tokens=None):
    """images [B, H, W, C] -> (pre-quantization features [B, T, F], the
    valid tokens bool [B, T] or None when all are, LaVIT's {"keep" [B, N]
    straight-through decisions, "kept" [B, T] the same moved with the
    tokens, "log_probs" [B, N, 2]} or {}). teacher_tokens: the frozen
    teacher's encoder tokens when the caller has them (read_teacher_encoder
    reads them; otherwise unused)."""
    if self.read_teacher_encoder:  # the frozen teacher's patch tokens
      x = (self._teacher_tokens(images) if teacher_tokens is None
           else teacher_tokens)
    else:
      x = self.encoder_tokens(images, deterministic)
    mask, selection = None, {}
    if self.num_queries:  # SEED: K causal queries read the patch tokens
      queries = jnp.broadcast_to(self.queries.astype(x.dtype),
                                 (x.shape[0], *self.queries.shape))
      x = self.qformer(queries, encoded=x, deterministic=deterministic)
    elif self.keep_ratio:  # LaVIT: select, merge, keep the kept in front
      log_probs = self.selector(x)  # [B, N, 2]: keep, drop
      if deterministic and self.keep_at_encode == "likelier":
        keep = (log_probs[..., 0] > log_probs[..., 1]).astype(jnp.float32)
      elif deterministic:  # "sampled": one fixed draw per patch slot
        noise = jax.random.gumbel(jax.random.PRNGKey(0), log_probs.shape[1:])
        keep = (jnp.argmax(log_probs + noise, -1) == 0).astype(jnp.float32)
      else:
        keep = dynamic.straight_through_gumbel(
            log_probs, self.make_rng("selector"))[..., 0]
      x = self.merger(x, keep.astype(x.dtype))
      (x, kept), mask = dynamic.compact((x, keep), keep)
      selection = {"keep": keep, "kept": kept, "log_probs": log_probs}
    return jnp.tanh(self.encoder_head(x)), mask, selection  # [B, T, F_enc]

  def _encode_features(self, images, deterministic):
    """images [B, H, W, C] -> pre-quantization features [B, T, F]."""
    return self._encode(images, deterministic)[0]

  def _decode_tokens(self, x, deterministic, mask=None):
    """Quantized tokens [B, T, D_dec] (valid where mask [B, T], default
    all) -> (mu, log_scale) [B, H, W, C] each, and the teacher's code
    logits [B, P, C] (teacher_codes > 0) or None."""
    x = self._decode_slots(x, deterministic, mask)
    if self.teacher_codes:  # the frozen grid draws the likeliest codes
      logits = self.code_head(x).astype(jnp.float32)  # [B, P, C]
      teacher = self.frozen_teacher
      mu, log_scale = teacher._decode_tokens(  # pylint: disable=protected-access
          teacher.code_vectors(jnp.argmax(logits, -1)), True)[:2]
      return (jax.lax.stop_gradient(mu), jax.lax.stop_gradient(log_scale),
              logits)
    x = jnp.tanh(self.decoder_head(x))  # [B, P, F_dec]
    out = self.patch_unembed(x, self.patch_grid).astype(jnp.float32)
    mu, log_scale = jnp.split(out, 2, axis=-1)  # [B, H, W, C] each
    return mu, log_scale, None

  def _decode_slots(self, x, deterministic, mask=None):
    """Quantized tokens [B, T, D_dec] -> the decoder's patch slots [B, P,
    D_dec]."""
    if not self.codes_on_grid:  # SEED / LaVIT: patch slots read the tokens
      tokens = self.token_positions(x)
      slots = self.decoder_positions(jnp.zeros(
          (x.shape[0], self.num_patches, x.shape[-1]), x.dtype))
      if self.token_decoder == "cross":
        x = self.decoder(slots, encoded=tokens, encoded_mask=mask,
                         deterministic=deterministic)
      else:  # joint: one stack over both; empty token slots are padding
        valid = (jnp.ones(tokens.shape[:2], jnp.int32) if mask is None
                 else mask.astype(jnp.int32))
        segments = jnp.concatenate(
            [valid, jnp.ones(slots.shape[:2], jnp.int32)], axis=1)
        x = self.decoder(jnp.concatenate([tokens, slots], axis=1),
                         segment_ids=segments, deterministic=deterministic)
        x = x[:, tokens.shape[1]:]
    else:
      x = self.decoder_positions(x)
      x = self.decoder(x, deterministic=deterministic)
    return x

  def __call__(self, images, train: bool = False):
    """images uint8 [B, H, W, C] -> dict of outputs.

    mu, log_scale: logit-Laplace parameters [B, H, W, C]; recon: the
    reconstruction in [0, 1]; ids [B, h, w] (-1: an empty LaVIT slot);
    losses: the quantizer's {"codebook", "commitment", "vq"} (+ "keep",
    "keep_per_image" for LaVIT); latents [B, T, code_dim] (unit norm).
    LaVIT adds token_mask [B, T] and keep [B, N], the straight-through
    decisions (training draws them with the "selector" rng).
    """
    b = images.shape[0]
    # The teacher's encoder runs once: for the targets and, with
    # read_teacher_encoder, as what the tokens read.
    teacher_tokens = (self._teacher_tokens(images) if self.teacher_codes
                      else None)
    features, mask, selection = self._encode(images, not train,
                                             teacher_tokens)
    ids, quantized, vq_losses, latents = self.quantizer(features, mask)
    if mask is not None:
      # The kept tokens enter the decoder times their straight-through
      # decisions (1 forward), so the reconstruction also scores keeping
      # each one; the merger's weights carry the dropped ones' share.
      quantized = quantized * selection["kept"][..., None].astype(
          quantized.dtype)
    mu, log_scale, teacher_logits = self._decode_tokens(quantized, not train,
                                                        mask)
    out = {
        "mu": mu,
        "log_scale": log_scale,
        "recon": losses_lib.logit_laplace_mean(mu),
        "ids": ids.reshape(b, *self.grid),
        "losses": vq_losses,
        "latents": latents,
    }
    if teacher_logits is not None:  # the targets: the teacher's encoding
      out["teacher_logits"] = teacher_logits
      out["teacher_ids"] = self.frozen_teacher._grid_ids(teacher_tokens)  # pylint: disable=protected-access
    if mask is not None:
      out["ids"] = jnp.where(mask, ids, -1).reshape(b, *self.grid)
      out["token_mask"] = mask
      out["keep"] = selection["keep"]
      keep = selection["keep"]
      out["losses"] = {
          **vq_losses,
          "keep": jnp.square(self.keep_ratio - jnp.mean(keep)),
          "keep_per_image": jnp.mean(jnp.square(
              self.keep_ratio - jnp.mean(keep, axis=1)))}
    return out

  def encode(self, images):
    """images [B, H, W, C] -> ids [B, h, w] int32 (-1: an empty slot)."""
    features, mask, _ = self._encode(images, deterministic=True)
    ids = self.quantizer.encode(features)
    if mask is not None:
      ids = jnp.where(mask, ids, -1)
    return ids.reshape(images.shape[0], *self.grid)

  def decode(self, ids):
    """ids [B, h, w] -> images float32 [B, H, W, C] in [0, 1]."""
    return self.decode_with_codes(ids)[0]

  def code_vectors(self, ids):
    """ids [B, T] -> the codes' vectors as the decoder reads them
    [B, T, D_dec] (no decoding; an empty slot, -1, reads code 0)."""
    return self.quantizer.embed_ids(jnp.maximum(ids, 0))

  def decode_with_codes(self, ids):
    """ids [B, h, w] -> (images [B, H, W, C] in [0, 1], the ids' code
    vectors as the decoder sees them [B, h, w, D_dec]); the upsampler's
    conditioning. Empty slots (-1) are not read."""
    b = ids.shape[0]
    flat = ids.reshape(b, -1)
    x = self.code_vectors(flat)  # [B, T, D_dec]
    mask = (flat >= 0) if self.keep_ratio else None
    mu = self._decode_tokens(x, True, mask)[0]
    return losses_lib.logit_laplace_mean(mu), x.reshape(*ids.shape, -1)


# ----------------------------------------------------------------------------
# Host-side API with input checks (used by unimm.load_tokenizer).
# ----------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _jitted(model: ViTVQGAN, method: str):
  if method == "encode":
    return jax.jit(lambda params, x: model.apply(
        {"params": params}, x, method=ViTVQGAN.encode))
  return jax.jit(lambda params, ids: jnp.round(model.apply(
      {"params": params}, ids, method=ViTVQGAN.decode) * 255.0).astype(
          jnp.uint8))


def _plain_params(params):
  params = nn.unbox(params)
  return params["params"] if "params" in params else params


def encode_images(model: ViTVQGAN, params, images) -> np.ndarray:
  """uint8 images [N, H, W, C] at model.image_size -> int32 ids [N, h, w]."""
  images = np.asarray(images)
  s, c = model.image_size, model.channels
  if images.dtype != np.uint8:
    raise ValueError(f"encode expects uint8 images, got dtype {images.dtype}; "
                     "convert with np.asarray(img, np.uint8) (values 0..255).")
  if images.ndim != 4 or images.shape[1:] != (s, s, c):
    raise ValueError(
        f"encode expects images of shape [N, {s}, {s}, {c}], got "
        f"{images.shape}; resize to the tokenizer's image_size ({s}) "
        "(config.model.image_size).")
  if not len(images):  # nothing to run (XLA cannot reshape a 0-row batch)
    return np.zeros((0, *model.grid), np.int32)
  return np.asarray(_jitted(model, "encode")(_plain_params(params), images))


def decode_ids(model: ViTVQGAN, params, ids) -> np.ndarray:
  """int ids [N, h, w] in [0, num_codes) -> uint8 images [N, H, W, C]."""
  ids = np.asarray(ids)
  h, w = model.grid
  if not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"decode expects integer ids, got dtype {ids.dtype}.")
  if ids.ndim != 3 or ids.shape[1:] != (h, w):
    raise ValueError(f"decode expects ids of shape [N, {h}, {w}], got "
                     f"{ids.shape}.")
  low = -1 if model.keep_ratio else 0
  if ids.size and (ids.min() < low or ids.max() >= model.num_codes):
    raise ValueError(
        f"decode got ids in [{ids.min()}, {ids.max()}]; expected {low} <= id "
        f"< num_codes={model.num_codes} (config.model.num_codes"
        f"{'; -1 marks an empty slot' if low else ''}).")
  if low and ids.size:
    empty = ids.reshape(len(ids), -1) < 0
    holes = np.nonzero(np.any(empty[:, :-1] & ~empty[:, 1:], axis=1))[0]
    if len(holes):
      raise ValueError(
          f"decode got an id after an empty slot (-1) in image {holes[0]}; "
          "a dynamic tokenizer's ids are the valid tokens first, then -1.")
  if not len(ids):
    s = model.image_size
    return np.zeros((0, s, s, model.channels), np.uint8)
  return np.asarray(_jitted(model, "decode")(_plain_params(params),
                                             ids.astype(np.int32)))
