"""CLIP (Radford et al. 2021) in Flax, equal to transformers' CLIPModel, and
CLIP score (Hessel et al. 2021) for text-to-image evaluation.

  model = load_clip("/path/to/clip-vit-base-patch32")
  model.encode_images(images)     # uint8 [N, H, W, 3] -> float32 [N, P]
  model.encode_texts(captions)    # list[str]          -> float32 [N, P]
  clip_score(model, images, captions)                 # -> float in [0, 100]

The directory is a Hugging Face CLIP checkpoint: config.json, model.safetensors
(or sharded safetensors, or pytorch_model.bin, read through torch), vocab.json
+ merges.txt (or tokenizer.json) and optionally preprocessor_config.json.
Everything around the network is reimplemented in plain Python/NumPy so that
no transformers is needed at evaluation time:

- ClipTokenizer: CLIP's byte-level BPE with `</w>` word ends. It equals
  transformers' CLIPTokenizer (transformers >= 5 ships only the `tokenizers`
  backed one: NFC, whitespace runs -> " ", lowercase, CLIP's split pattern).
  The legacy slow tokenizer also split around CJK characters; this does not.
- ClipPreprocessing: CLIPImageProcessor's PIL path (resize the shortest side
  with PIL bicubic, center crop, rescale, normalize with the OpenAI mean/std).
  transformers' torchvision backend resizes with torch's bicubic and differs
  from PIL by a few 1e-3 per pixel; the original OpenAI CLIP uses PIL.
- Text pooling: the hidden state at the first `eos_token_id` of each row, or,
  for configs with the pre-2023 eos_token_id == 2, at argmax(input_ids)
  (transformers keeps both; the original CLIP uses argmax).
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
# Registers bfloat16 with numpy, for bf16 tensors in safetensors.numpy.
import ml_dtypes  # noqa: F401  pylint: disable=unused-import
import numpy as np
from PIL import Image

from unimm import nn as unn
from unimm import parallel
from unimm.nn.attention import dot_product_attention
from unimm.progress import Progress

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
LEGACY_EOS_TOKEN_ID = 2  # transformers: eos_token_id == 2 -> argmax pooling

_ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),  # OpenAI CLIP
    "gelu": functools.partial(jax.nn.gelu, approximate=False),  # erf GELU
    "gelu_new": functools.partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": functools.partial(jax.nn.gelu, approximate=True),
    "relu": jax.nn.relu,
}


# ---------------------------------------------------------------------------
# Configuration.


@dataclasses.dataclass(frozen=True)
class ClipTextConfig:
  """The text tower (defaults: transformers' CLIPTextConfig)."""
  vocab_size: int = 49408
  embed_dim: int = 512
  mlp_dim: int = 2048
  num_heads: int = 8
  num_layers: int = 12
  max_len: int = 77
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  eos_token_id: int = 49407  # LEGACY_EOS_TOKEN_ID selects argmax pooling
  projection_dim: int = 512


@dataclasses.dataclass(frozen=True)
class ClipVisionConfig:
  """The ViT image tower (defaults: transformers' CLIPVisionConfig)."""
  image_size: int = 224
  patch_size: int = 32
  embed_dim: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  activation: str = "quick_gelu"
  layer_norm_eps: float = 1e-5
  projection_dim: int = 512


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """Both towers; clip_config() reads it from a HF config.json."""
  text: ClipTextConfig
  vision: ClipVisionConfig


def _square(value: Any, name: str, path: str) -> int:
  if isinstance(value, (list, tuple)):
    if len(set(value)) != 1:
      raise ValueError(f"{path}: vision_config.{name}={value}; only square "
                       "images and patches are supported.")
    value = value[0]
  return int(value)


def clip_config(path: str) -> ClipConfig:
  """ClipConfig from a Hugging Face CLIP config.json (file or directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"No CLIP config at {path!r}; expected the config.json "
                     "of a Hugging Face CLIP checkpoint directory "
                     "(CLIPModel.save_pretrained).")
  with open(path) as f:
    hf = json.load(f)
  if hf.get("model_type", "clip") != "clip":
    raise ValueError(f"{path}: model_type={hf['model_type']!r}; expected "
                     "'clip' (a CLIPModel checkpoint).")
  text = dict(hf.get("text_config") or {})
  text.update(hf.get("text_config_dict") or {})  # old configs: this wins
  vision = dict(hf.get("vision_config") or {})
  vision.update(hf.get("vision_config_dict") or {})
  projection_dim = int(hf.get("projection_dim", 512))
  t, v = ClipTextConfig(), ClipVisionConfig()
  eos = text.get("eos_token_id", t.eos_token_id)
  if isinstance(eos, list):
    eos = eos[0]
  config = ClipConfig(
      text=ClipTextConfig(
          vocab_size=int(text.get("vocab_size", t.vocab_size)),
          embed_dim=int(text.get("hidden_size", t.embed_dim)),
          mlp_dim=int(text.get("intermediate_size", t.mlp_dim)),
          num_heads=int(text.get("num_attention_heads", t.num_heads)),
          num_layers=int(text.get("num_hidden_layers", t.num_layers)),
          max_len=int(text.get("max_position_embeddings", t.max_len)),
          activation=text.get("hidden_act", t.activation),
          layer_norm_eps=float(text.get("layer_norm_eps", t.layer_norm_eps)),
          eos_token_id=int(eos), projection_dim=projection_dim),
      vision=ClipVisionConfig(
          image_size=_square(vision.get("image_size", v.image_size),
                             "image_size", path),
          patch_size=_square(vision.get("patch_size", v.patch_size),
                             "patch_size", path),
          embed_dim=int(vision.get("hidden_size", v.embed_dim)),
          mlp_dim=int(vision.get("intermediate_size", v.mlp_dim)),
          num_heads=int(vision.get("num_attention_heads", v.num_heads)),
          num_layers=int(vision.get("num_hidden_layers", v.num_layers)),
          activation=vision.get("hidden_act", v.activation),
          layer_norm_eps=float(vision.get("layer_norm_eps",
                                          v.layer_norm_eps)),
          projection_dim=projection_dim))
  for tower, c in (("text_config", config.text),
                   ("vision_config", config.vision)):
    if c.activation not in _ACTIVATIONS:
      raise ValueError(f"{path}: {tower}.hidden_act={c.activation!r}; "
                       f"expected one of {sorted(_ACTIVATIONS)}.")
    if c.embed_dim % c.num_heads:
      raise ValueError(f"{path}: {tower}.hidden_size={c.embed_dim} is not a "
                       f"multiple of num_attention_heads={c.num_heads}.")
  if config.vision.image_size % config.vision.patch_size:
    raise ValueError(f"{path}: vision_config.patch_size="
                     f"{config.vision.patch_size} does not divide image_size="
                     f"{config.vision.image_size}.")
  if int(vision.get("num_channels", 3)) != 3:
    raise ValueError(f"{path}: vision_config.num_channels="
                     f"{vision['num_channels']}; CLIP images are RGB (3).")
  return config


# ---------------------------------------------------------------------------
# The network.


def _layer_norm(eps: float, dtype: str, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(
      epsilon=eps, dtype=jnp.dtype(dtype), use_fast_variance=False,
      scale_init=unn.partitioned(nn.initializers.ones, ("norm",)),
      bias_init=unn.partitioned(nn.initializers.zeros, ("norm",)), name=name)


class ClipBlock(nn.Module):
  """Pre-LN block: attention with q/k/v/out biases, then fc1-act-fc2."""
  embed_dim: int
  num_heads: int
  mlp_dim: int
  activation: str
  layer_norm_eps: float
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask):  # x: [B, T, D]; mask: bool [1, T, T] or None
    kw = dict(dtype=self.dtype, use_bias=True)
    head_dim = self.embed_dim // self.num_heads
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm1")(x)
    q, k, v = (unn.dense((self.num_heads, head_dim),
                         ("embed", "heads", "head_dim"), name=f"{n}_proj",
                         **kw)(h) for n in "qkv")  # [B, T, N, H]
    a = dot_product_attention(q, k, v, mask)  # [B, T, N, H]
    x = x + unn.dense(self.embed_dim, ("heads", "head_dim", "embed"),
                      axis=(-2, -1), name="out_proj", **kw)(a)
    h = _layer_norm(self.layer_norm_eps, self.dtype, "layer_norm2")(x)
    h = unn.dense(self.mlp_dim, ("embed", "mlp"), name="fc1", **kw)(h)
    h = _ACTIVATIONS[self.activation](h)  # [B, T, F]
    x = x + unn.dense(self.embed_dim, ("mlp", "embed"), name="fc2", **kw)(h)
    return unn.constrain(x)


class ClipTextTower(nn.Module):
  """ids int [B, T] (T <= max_len) -> projected text embeddings [B, P]."""
  vocab_size: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  max_len: int
  activation: str
  layer_norm_eps: float
  eos_token_id: int
  projection_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, ids):
    b, t = ids.shape
    if t > self.max_len:
      raise ValueError(f"Text of {t} tokens; this CLIP has "
                       f"max_position_embeddings={self.max_len}. Tokenize "
                       "with truncation to max_len.")
    tokens = self.param(
        "token_embedding",
        unn.partitioned(nn.initializers.normal(0.02), ("vocab", "embed")),
        (self.vocab_size, self.embed_dim))
    positions = self.param(
        "position_embedding",
        unn.partitioned(nn.initializers.normal(0.02), (None, "embed")),
        (self.max_len, self.embed_dim))
    x = jnp.take(tokens, ids, axis=0) + positions[None, :t]  # [B, T, D]
    x = x.astype(jnp.dtype(self.dtype))
    causal = jnp.tril(jnp.ones((1, t, t), bool))  # [1, T, T]
    for i in range(self.num_layers):
      x = ClipBlock(self.embed_dim, self.num_heads, self.mlp_dim,
                    self.activation, self.layer_norm_eps, self.dtype,
                    name=f"layers_{i}")(x, causal)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "final_layer_norm")(x)
    if self.eos_token_id == LEGACY_EOS_TOKEN_ID:
      eos = jnp.argmax(ids, axis=-1)  # original CLIP: eot has the top id
    else:  # first eos (padding may also be eos); 0 when there is none
      eos = jnp.argmax(ids == self.eos_token_id, axis=-1)
    pooled = x[jnp.arange(b), eos]  # [B, D]
    return unn.dense(self.projection_dim, ("embed", None),
                     dtype=self.dtype, name="text_projection")(pooled)


class ClipVisionTower(nn.Module):
  """Normalized pixels [B, S, S, 3] -> projected image embeddings [B, P]."""
  image_size: int
  patch_size: int
  embed_dim: int
  mlp_dim: int
  num_heads: int
  num_layers: int
  activation: str
  layer_norm_eps: float
  projection_dim: int
  dtype: str = "float32"

  @nn.compact
  def __call__(self, pixels):
    b, h, w, c = pixels.shape
    s, p = self.image_size, self.patch_size
    if (h, w, c) != (s, s, 3):
      raise ValueError(f"Pixels of shape {pixels.shape}; this CLIP expects "
                       f"[B, {s}, {s}, 3] (preprocess images first).")
    g = s // p
    patches = pixels.reshape(b, g, p, g, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, g * g, p * p * c)  # [B, G*G, p*p*3]
    x = unn.dense(self.embed_dim, ("patch", "embed"), dtype=self.dtype,
                  name="patch_embedding")(patches)  # conv without bias
    cls = self.param(
        "class_embedding",
        unn.partitioned(nn.initializers.normal(self.embed_dim**-0.5),
                        ("embed",)), (self.embed_dim,))
    positions = self.param(
        "position_embedding",
        unn.partitioned(nn.initializers.normal(0.02), (None, "embed")),
        (g * g + 1, self.embed_dim))
    cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, self.embed_dim))
    x = jnp.concatenate([cls, x], axis=1) + positions[None].astype(x.dtype)
    x = _layer_norm(self.layer_norm_eps, self.dtype, "pre_layernorm")(x)
    for i in range(self.num_layers):
      x = ClipBlock(self.embed_dim, self.num_heads, self.mlp_dim,
                    self.activation, self.layer_norm_eps, self.dtype,
                    name=f"layers_{i}")(x, None)  # [B, 1+G*G, D]
    pooled = _layer_norm(self.layer_norm_eps, self.dtype,
                         "post_layernorm")(x[:, 0])  # class token [B, D]
    return unn.dense(self.projection_dim, ("embed", None),
                     dtype=self.dtype, name="visual_projection")(pooled)


class Clip(nn.Module):
  """Both towers and the contrastive temperature (logit_scale, a log)."""
  text: ClipTextConfig
  vision: ClipVisionConfig
  dtype: str = "float32"

  def setup(self):
    self.text_tower = ClipTextTower(**dataclasses.asdict(self.text),
                                    dtype=self.dtype)
    self.vision_tower = ClipVisionTower(**dataclasses.asdict(self.vision),
                                        dtype=self.dtype)
    self.logit_scale = self.param(
        "logit_scale", unn.partitioned(nn.initializers.constant(2.6592), ()),
        ())

  def encode_images(self, pixels):  # [B, S, S, 3] -> [B, P]
    return self.vision_tower(pixels)

  def encode_texts(self, ids):  # [B, T] -> [B, P]
    return self.text_tower(ids)

  def __call__(self, pixels, ids):
    """logits_per_image [B_img, B_txt], as CLIPModel's."""
    image = self.encode_images(pixels).astype(jnp.float32)
    text = self.encode_texts(ids).astype(jnp.float32)
    image = image / jnp.linalg.norm(image, axis=-1, keepdims=True)
    text = text / jnp.linalg.norm(text, axis=-1, keepdims=True)
    return jnp.exp(self.logit_scale) * image @ text.T


# ---------------------------------------------------------------------------
# Weights: transformers' names.

_Entry = tuple[str, tuple[int, ...], Callable[[np.ndarray], np.ndarray]]


def _block_names(hf: str, ours: tuple[str, ...], d: int, n: int, f: int
                 ) -> dict[tuple[str, ...], _Entry]:
  """One encoder layer's entries: our path -> (HF name, HF shape, to ours)."""
  h = d // n
  same = lambda w: w
  names = {}
  for p in "qkv":
    names[ours + (f"{p}_proj", "kernel")] = (
        f"{hf}.self_attn.{p}_proj.weight", (d, d),
        lambda w: w.T.reshape(d, n, h))  # [N*H, D] -> [D, N, H]
    names[ours + (f"{p}_proj", "bias")] = (
        f"{hf}.self_attn.{p}_proj.bias", (d,), lambda w: w.reshape(n, h))
  names[ours + ("out_proj", "kernel")] = (
      f"{hf}.self_attn.out_proj.weight", (d, d),
      lambda w: w.T.reshape(n, h, d))  # [D, N*H] -> [N, H, D]
  names[ours + ("out_proj", "bias")] = (f"{hf}.self_attn.out_proj.bias",
                                        (d,), same)
  for norm in ("layer_norm1", "layer_norm2"):
    names[ours + (norm, "scale")] = (f"{hf}.{norm}.weight", (d,), same)
    names[ours + (norm, "bias")] = (f"{hf}.{norm}.bias", (d,), same)
  for fc, (fan_in, fan_out) in (("fc1", (d, f)), ("fc2", (f, d))):
    names[ours + (fc, "kernel")] = (f"{hf}.mlp.{fc}.weight",
                                    (fan_out, fan_in), lambda w: w.T)
    names[ours + (fc, "bias")] = (f"{hf}.mlp.{fc}.bias", (fan_out,), same)
  return names


def hf_names(config: ClipConfig) -> dict[tuple[str, ...], _Entry]:
  """unimm param path -> (HF tensor name, HF shape, numpy HF -> unimm)."""
  t, v = config.text, config.vision
  same = lambda w: w
  names = {}
  tt, vt = ("text_tower",), ("vision_tower",)
  names[tt + ("token_embedding",)] = (
      "text_model.embeddings.token_embedding.weight",
      (t.vocab_size, t.embed_dim), same)
  names[tt + ("position_embedding",)] = (
      "text_model.embeddings.position_embedding.weight",
      (t.max_len, t.embed_dim), same)
  for i in range(t.num_layers):
    names.update(_block_names(f"text_model.encoder.layers.{i}",
                              tt + (f"layers_{i}",), t.embed_dim,
                              t.num_heads, t.mlp_dim))
  names[tt + ("final_layer_norm", "scale")] = (
      "text_model.final_layer_norm.weight", (t.embed_dim,), same)
  names[tt + ("final_layer_norm", "bias")] = (
      "text_model.final_layer_norm.bias", (t.embed_dim,), same)
  names[tt + ("text_projection", "kernel")] = (
      "text_projection.weight", (t.projection_dim, t.embed_dim),
      lambda w: w.T)

  p, d, g = v.patch_size, v.embed_dim, v.image_size // v.patch_size
  names[vt + ("class_embedding",)] = (
      "vision_model.embeddings.class_embedding", (d,), same)
  names[vt + ("patch_embedding", "kernel")] = (  # [D, C, p, p] -> [p*p*C, D]
      "vision_model.embeddings.patch_embedding.weight", (d, 3, p, p),
      lambda w: w.transpose(2, 3, 1, 0).reshape(p * p * 3, d))
  names[vt + ("position_embedding",)] = (
      "vision_model.embeddings.position_embedding.weight", (g * g + 1, d),
      same)
  names[vt + ("pre_layernorm", "scale")] = ("vision_model.pre_layrnorm.weight",
                                            (d,), same)
  names[vt + ("pre_layernorm", "bias")] = ("vision_model.pre_layrnorm.bias",
                                           (d,), same)
  for i in range(v.num_layers):
    names.update(_block_names(f"vision_model.encoder.layers.{i}",
                              vt + (f"layers_{i}",), d, v.num_heads,
                              v.mlp_dim))
  names[vt + ("post_layernorm", "scale")] = (
      "vision_model.post_layernorm.weight", (d,), same)
  names[vt + ("post_layernorm", "bias")] = ("vision_model.post_layernorm.bias",
                                            (d,), same)
  names[vt + ("visual_projection", "kernel")] = (
      "visual_projection.weight", (v.projection_dim, d), lambda w: w.T)
  names[("logit_scale",)] = ("logit_scale", (), same)
  return names


def _read_tensors(directory: str, wanted: Sequence[str]
                  ) -> tuple[str, dict[str, np.ndarray]]:
  """(weights file named in errors, {HF name: float32 array}) for `wanted`."""
  single = os.path.join(directory, "model.safetensors")
  index = single + ".index.json"
  torch_bin = os.path.join(directory, "pytorch_model.bin")
  tensors = {}
  if os.path.exists(single) or os.path.exists(index):
    from safetensors import safe_open  # pylint: disable=g-import-not-at-top
    source, files = single, [single]
    if not os.path.exists(single):
      with open(index) as f:
        shards = set(json.load(f)["weight_map"].values())
      source = index
      files = [os.path.join(directory, s) for s in sorted(shards)]
    for path in files:
      with safe_open(path, framework="numpy") as f:
        for key in f.keys():
          if key in wanted:
            tensors[key] = np.asarray(f.get_tensor(key), np.float32)
    return source, tensors
  if os.path.exists(torch_bin):
    import torch  # pylint: disable=g-import-not-at-top
    state = torch.load(torch_bin, map_location="cpu", weights_only=True)
    return torch_bin, {k: v.float().numpy() for k, v in state.items()
                       if k in wanted}
  raise ValueError(f"No CLIP weights in {directory!r}; expected "
                   "model.safetensors, model.safetensors.index.json (sharded) "
                   "or pytorch_model.bin (CLIPModel.save_pretrained).")


def load_clip_params(directory: str, config: ClipConfig | None = None,
                     dtype: str = "float32") -> tuple[Clip, dict[str, Any]]:
  """(Clip network, plain params) from a local HF CLIP checkpoint."""
  config = config or clip_config(directory)
  network = Clip(config.text, config.vision, dtype=dtype)
  s = config.vision.image_size
  abstract = jax.eval_shape(lambda: network.init(
      jax.random.key(0), jnp.zeros((1, s, s, 3)), jnp.zeros((1, 2), jnp.int32)))
  abstract = traverse_util.flatten_dict(parallel.unbox(abstract["params"]))
  names = hf_names(config)
  if set(names) != set(abstract):  # a bug here, not in the checkpoint
    raise AssertionError(f"hf_names and Clip disagree: "
                         f"{sorted(set(names) ^ set(abstract))}")
  source, tensors = _read_tensors(directory, {n for n, _, _ in names.values()})
  flat = {}
  for path, (hf_name, hf_shape, transform) in names.items():
    if hf_name not in tensors:
      raise ValueError(f"{source}: tensor {hf_name!r} is missing (needed for "
                       f"{'/'.join(path)}); is this a CLIPModel checkpoint?")
    value = tensors[hf_name]
    if value.shape != hf_shape:
      raise ValueError(
          f"{source}: tensor {hf_name!r} has shape {value.shape}; config.json "
          f"implies {hf_shape}. The config does not belong to these weights.")
    flat[path] = transform(value).astype(np.float32)
    assert flat[path].shape == abstract[path].shape, path
  return network, traverse_util.unflatten_dict(flat)


# ---------------------------------------------------------------------------
# Tokenizer.


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """GPT-2/CLIP's reversible map of the 256 bytes to printable characters."""
  printable = (list(range(ord("!"), ord("~") + 1)) +
               list(range(ord("¡"), ord("¬") + 1)) +
               list(range(ord("®"), ord("ÿ") + 1)))
  chars = printable[:]
  extra = 0
  for b in range(256):
    if b not in printable:
      printable.append(b)
      chars.append(256 + extra)
      extra += 1
  return dict(zip(printable, map(chr, chars)))


def _is_letter(ch: str) -> bool:
  return unicodedata.category(ch)[0] == "L"


def _is_number(ch: str) -> bool:
  return unicodedata.category(ch)[0] == "N"


_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")


def split_words(text: str) -> list[str]:
  """CLIP's pre-tokenizer: the matches, in order, of
  <|startoftext|>|<|endoftext|>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|
  [^\\s\\p{L}\\p{N}]+ (a scanner, so no `regex` module is needed)."""
  words, i, n = [], 0, len(text)
  while i < n:
    ch = text[i]
    if ch.isspace():
      i += 1
      continue
    special = next((s for s in (BOS_TOKEN, EOS_TOKEN) + _CONTRACTIONS
                    if text.startswith(s, i)), None)
    if special is not None:
      j = i + len(special)
    elif _is_letter(ch):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(ch):
      j = i + 1  # digits are single tokens
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or
                           _is_number(text[j])):
        j += 1
    words.append(text[i:j])
    i = j
  return words


class ClipTokenizer:
  """CLIP's byte-level BPE: texts -> ids int32 [N, max_len] with
  <|startoftext|> ... <|endoftext|>, truncated to max_len and padded."""

  def __init__(self, vocab: dict[str, int], merges: Sequence[tuple[str, str]],
               max_len: int = 77, pad_token: str = EOS_TOKEN):
    for token in (BOS_TOKEN, EOS_TOKEN, pad_token):
      if token not in vocab:
        raise ValueError(f"Token {token!r} is not in the CLIP vocabulary "
                         f"({len(vocab)} entries).")
    if max_len < 2:
      raise ValueError(f"max_len={max_len}; needs room for bos and eos.")
    self.vocab = vocab
    self.ranks = {tuple(pair): i for i, pair in enumerate(merges)}
    self.max_len = max_len
    self.bos_id, self.eos_id = vocab[BOS_TOKEN], vocab[EOS_TOKEN]
    self.pad_id = vocab[pad_token]
    self.unk_id = self.eos_id  # CLIPTokenizer's unk_token is <|endoftext|>
    self._byte_chars = bytes_to_unicode()
    self._cache = {BOS_TOKEN: [self.bos_id], EOS_TOKEN: [self.eos_id]}

  @classmethod
  def from_directory(cls, directory: str, max_len: int = 77
                     ) -> "ClipTokenizer":
    """From vocab.json + merges.txt, else tokenizer.json; pad_token from
    tokenizer_config.json / special_tokens_map.json when given."""
    vocab_file = os.path.join(directory, "vocab.json")
    merges_file = os.path.join(directory, "merges.txt")
    fast_file = os.path.join(directory, "tokenizer.json")
    if os.path.exists(vocab_file) and os.path.exists(merges_file):
      with open(vocab_file, encoding="utf-8") as f:
        vocab = json.load(f)
      with open(merges_file, encoding="utf-8") as f:
        lines = f.read().split("\n")
      merges = [tuple(line.split()) for line in lines
                if line.strip() and not line.startswith("#version")]
    elif os.path.exists(fast_file):
      with open(fast_file, encoding="utf-8") as f:
        model = json.load(f)["model"]
      vocab = model["vocab"]
      merges = [tuple(m.split() if isinstance(m, str) else m)
                for m in model["merges"]]
    else:
      raise ValueError(f"No CLIP tokenizer in {directory!r}; expected "
                       "vocab.json and merges.txt (or tokenizer.json), as "
                       "CLIPTokenizer.save_pretrained writes them.")
    pad_token = EOS_TOKEN
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
      path = os.path.join(directory, name)
      if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
          pad = json.load(f).get("pad_token")
        if isinstance(pad, dict):
          pad = pad.get("content")
        if pad:
          pad_token = pad
          break
    return cls(vocab, merges, max_len=max_len, pad_token=pad_token)

  def _bpe(self, word: str) -> list[int]:
    """Ids of one pre-tokenized word (already mapped to byte characters)."""
    if word in self._cache:
      return self._cache[word]
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      pairs = {(a, b) for a, b in zip(parts, parts[1:])}
      best = min(pairs, key=lambda pair: self.ranks.get(pair, float("inf")))
      if best not in self.ranks:
        break
      merged, i = [], 0
      while i < len(parts):  # merge every occurrence, left to right
        if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
          merged.append(parts[i] + parts[i + 1])
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    ids = [self.vocab.get(p, self.unk_id) for p in parts]
    self._cache[word] = ids
    return ids

  def tokenize(self, text: str) -> list[int]:
    """Ids of one text without bos/eos, not truncated."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"\s+", " ", text).lower()
    ids = []
    for word in split_words(text):
      if word not in (BOS_TOKEN, EOS_TOKEN):
        word = "".join(self._byte_chars[b] for b in word.encode("utf-8"))
      ids.extend(self._bpe(word))
    return ids

  def __call__(self, texts: Sequence[str]) -> np.ndarray:
    """int32 [N, max_len]: bos, ids[:max_len - 2], eos, padding."""
    if isinstance(texts, str):
      raise ValueError("ClipTokenizer takes a list of texts, got one str.")
    out = np.full((len(texts), self.max_len), self.pad_id, np.int32)
    for row, text in enumerate(texts):
      ids = [self.bos_id] + self.tokenize(text)[:self.max_len - 2]
      ids.append(self.eos_id)
      out[row, :len(ids)] = ids
    return out


# ---------------------------------------------------------------------------
# Image preprocessing.


@dataclasses.dataclass(frozen=True)
class ClipPreprocessing:
  """CLIPImageProcessor's defaults (PIL path): uint8 images -> [S, S, 3]."""
  shortest_edge: int = 224
  crop_size: tuple[int, int] = (224, 224)  # (height, width)
  resample: int = 3  # PIL.Image.BICUBIC
  rescale_factor: float = 1 / 255
  mean: tuple[float, ...] = OPENAI_CLIP_MEAN
  std: tuple[float, ...] = OPENAI_CLIP_STD
  do_resize: bool = True
  do_center_crop: bool = True
  do_rescale: bool = True
  do_normalize: bool = True

  @classmethod
  def from_directory(cls, directory: str, image_size: int
                     ) -> "ClipPreprocessing":
    """preprocessor_config.json if present, else defaults at image_size."""
    path = os.path.join(directory, "preprocessor_config.json")
    if not os.path.exists(path):
      return cls(shortest_edge=image_size, crop_size=(image_size, image_size))
    with open(path) as f:
      hf = json.load(f)
    size = hf.get("size", image_size)
    if isinstance(size, dict):
      if "shortest_edge" not in size:
        raise ValueError(f"{path}: size={size}; only {{'shortest_edge': n}} "
                         "resizing (CLIPImageProcessor's) is supported.")
      size = size["shortest_edge"]
    crop = hf.get("crop_size", image_size)
    crop = ((crop["height"], crop["width"]) if isinstance(crop, dict)
            else (crop, crop))
    out = cls(shortest_edge=int(size), crop_size=tuple(map(int, crop)),
              resample=int(hf.get("resample", 3)),
              rescale_factor=float(hf.get("rescale_factor", 1 / 255)),
              mean=tuple(hf.get("image_mean", OPENAI_CLIP_MEAN)),
              std=tuple(hf.get("image_std", OPENAI_CLIP_STD)),
              do_resize=bool(hf.get("do_resize", True)),
              do_center_crop=bool(hf.get("do_center_crop", True)),
              do_rescale=bool(hf.get("do_rescale", True)),
              do_normalize=bool(hf.get("do_normalize", True)))
    if out.do_center_crop and out.crop_size != (image_size, image_size):
      raise ValueError(f"{path}: crop_size={out.crop_size}, but the model "
                       f"takes {image_size}x{image_size} images.")
    return out

  def __call__(self, image: Any) -> np.ndarray:
    """One image (uint8 [H, W], [H, W, 1|3|4] or a PIL image) ->
    float32 [crop_h, crop_w, 3]."""
    image = _to_rgb(image)  # uint8 [H, W, 3]
    if self.do_resize:
      h, w = image.shape[:2]
      short, long = (w, h) if w <= h else (h, w)
      new_short, new_long = self.shortest_edge, int(
          self.shortest_edge * long / short)  # truncates, as transformers
      new_h, new_w = (new_long, new_short) if w <= h else (new_short, new_long)
      image = np.asarray(Image.fromarray(image).resize(
          (new_w, new_h), resample=self.resample))
    if self.do_center_crop:
      image = _center_crop(image, *self.crop_size)
    if self.do_rescale:  # float64 product, then float32: as transformers
      image = (image.astype(np.float64) * self.rescale_factor).astype(
          np.float32)
    image = image.astype(np.float32)
    if self.do_normalize:
      image = (image - np.asarray(self.mean, np.float32)) / np.asarray(
          self.std, np.float32)
    return image


def _to_rgb(image: Any) -> np.ndarray:
  """uint8 [H, W, 3]; alpha composited onto white, as transformers does."""
  if isinstance(image, Image.Image):
    if "A" in image.getbands() or image.info.get("transparency") is not None:
      image = image.convert("RGBA")
      white = Image.new("RGBA", image.size, (255, 255, 255, 255))
      image = Image.alpha_composite(white, image)
    return np.asarray(image.convert("RGB"))
  image = np.asarray(image)
  if image.dtype != np.uint8:
    raise ValueError(f"Image of dtype {image.dtype}; expected uint8 in "
                     "[0, 255] (convert with (x * 255).round().astype("
                     "np.uint8) if it is a float in [0, 1]).")
  if image.ndim == 2:
    image = image[..., None]
  if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
    raise ValueError(f"Image of shape {image.shape}; expected [H, W], "
                     "[H, W, 1], [H, W, 3] or [H, W, 4].")
  if image.shape[-1] == 1:
    return np.repeat(image, 3, axis=-1)
  if image.shape[-1] == 4:
    alpha = image[..., 3:] / 255
    return np.round(alpha * image[..., :3] + (1 - alpha) * 255).astype(
        np.uint8)
  return image


def _center_crop(image: np.ndarray, height: int, width: int) -> np.ndarray:
  """transformers' center_crop: (size - crop) // 2 offsets, zero padding
  when the image is smaller than the crop."""
  h, w = image.shape[:2]
  top, left = (h - height) // 2, (w - width) // 2
  if top >= 0 and left >= 0:
    return image[top:top + height, left:left + width]
  new_h, new_w = max(h, height), max(w, width)
  padded = np.zeros((new_h, new_w) + image.shape[2:], image.dtype)
  pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
  padded[pad_top:pad_top + h, pad_left:pad_left + w] = image
  top, left = top + pad_top, left + pad_left
  return padded[max(0, top):min(new_h, top + height),
                max(0, left):min(new_w, left + width)]


# ---------------------------------------------------------------------------
# The loaded model and CLIP score.


def _batches(n: int, batch_size: int, what: str) -> Iterator[tuple[int, int]]:
  """(start, stop) of each batch, logging progress and an ETA every ~10 s."""
  progress = Progress(n, what=f"CLIP {what}")
  for lo in range(0, n, batch_size):
    yield lo, min(n, lo + batch_size)
    progress.update(min(n, lo + batch_size))


def _pad_rows(x: np.ndarray, rows: int) -> np.ndarray:
  """x padded with zero rows to `rows` (one compiled shape per run)."""
  if len(x) == rows:
    return x
  return np.concatenate([x, np.zeros((rows - len(x),) + x.shape[1:],
                                     x.dtype)])


class ClipModel:
  """A loaded CLIP: network, params, tokenizer and preprocessing, with
  batched, jitted encoders returning float32 numpy [N, P] (projected, not
  normalized: CLIPModel.get_image_features / get_text_features)."""

  def __init__(self, config: ClipConfig, network: Clip,
               params: dict[str, Any], tokenizer: ClipTokenizer | None,
               preprocessing: ClipPreprocessing, batch_size: int = 64,
               tokenizer_error: str = ""):
    self.config = config
    self.network = network
    self.params = jax.device_put(params)
    self.tokenizer = tokenizer
    self.preprocessing = preprocessing
    self.batch_size = batch_size
    self._tokenizer_error = tokenizer_error
    apply = lambda method: jax.jit(lambda params, x: network.apply(
        {"params": params}, x, method=method).astype(jnp.float32))
    self._encode_pixels = apply(Clip.encode_images)
    self._encode_ids = apply(Clip.encode_texts)

  @property
  def logit_scale(self) -> float:
    return float(self.params["logit_scale"])

  def preprocess(self, images: Any) -> np.ndarray:
    """uint8 [N, H, W, 3] (or a list of images of any size / mode) ->
    normalized float32 [N, S, S, 3], as CLIPImageProcessor's pixel_values
    (which are [N, 3, S, S])."""
    return np.stack([self.preprocessing(image) for image in images])

  def encode_images(self, images: Any, batch_size: int | None = None
                    ) -> np.ndarray:
    """Images (see preprocess) -> float32 [N, P]."""
    n = len(images)
    if n == 0:
      raise ValueError("encode_images got no images.")
    rows = min(batch_size or self.batch_size, n)
    out = []
    for lo, hi in _batches(n, rows, "images"):
      pixels = _pad_rows(self.preprocess(images[lo:hi]), rows)
      out.append(np.asarray(self._encode_pixels(self.params, pixels))[
          :hi - lo])
    return np.concatenate(out)

  def encode_text_ids(self, ids: np.ndarray, batch_size: int | None = None
                      ) -> np.ndarray:
    """Token ids int [N, T] (T <= max_len, with bos/eos) -> float32 [N, P]."""
    ids = np.asarray(ids, np.int32)
    if ids.ndim != 2 or len(ids) == 0:
      raise ValueError(f"Token ids of shape {ids.shape}; expected [N, T].")
    rows = min(batch_size or self.batch_size, len(ids))
    out = []
    for lo, hi in _batches(len(ids), rows, "texts"):
      out.append(np.asarray(self._encode_ids(
          self.params, _pad_rows(ids[lo:hi], rows)))[:hi - lo])
    return np.concatenate(out)

  def encode_texts(self, texts: Sequence[str], batch_size: int | None = None
                   ) -> np.ndarray:
    """Texts -> float32 [N, P] (tokenized to max_len, truncating)."""
    if self.tokenizer is None:
      raise ValueError(self._tokenizer_error)
    return self.encode_text_ids(self.tokenizer(texts), batch_size)


def load_clip(directory: str, dtype: str = "float32", batch_size: int = 64
              ) -> ClipModel:
  """A ClipModel from a local Hugging Face CLIP checkpoint directory. The
  tokenizer files are optional (encode_texts then raises)."""
  if not os.path.isdir(directory):
    raise ValueError(f"No CLIP checkpoint directory at {directory!r}.")
  config = clip_config(directory)
  network, params = load_clip_params(directory, config, dtype)
  tokenizer, error = None, ""
  try:
    tokenizer = ClipTokenizer.from_directory(directory, config.text.max_len)
  except ValueError as e:
    error = str(e)
  preprocessing = ClipPreprocessing.from_directory(directory,
                                                   config.vision.image_size)
  return ClipModel(config, network, params, tokenizer, preprocessing,
                   batch_size=batch_size, tokenizer_error=error)


def clip_scores(model: ClipModel, images: Any, captions: Sequence[str],
                batch_size: int | None = None) -> np.ndarray:
  """Per-sample CLIP score float64 [N]: 100 * max(cos(image, caption), 0)."""
  if len(images) != len(captions):
    raise ValueError(f"{len(images)} images but {len(captions)} captions; "
                     "clip_score pairs image i with caption i.")
  image = model.encode_images(images, batch_size).astype(np.float64)
  text = model.encode_texts(captions, batch_size).astype(np.float64)
  image /= np.linalg.norm(image, axis=-1, keepdims=True)
  text /= np.linalg.norm(text, axis=-1, keepdims=True)
  return 100 * np.maximum(np.sum(image * text, axis=-1), 0)


def clip_score(model: ClipModel, images: Any, captions: Sequence[str],
               batch_size: int | None = None) -> float:
  """Mean over samples of 100 * max(cos, 0), clamped per sample (CLIP-S,
  Hessel et al. 2021 §3, with w = 100 instead of 2.5).

  torchmetrics' CLIPScore clamps after averaging, max(mean(100 * cos), 0);
  the two differ only when some cos < 0 (rare for real images and captions).
  Captions longer than max_len tokens are truncated, as torchmetrics does.
  """
  return float(np.mean(clip_scores(model, images, captions, batch_size)))
