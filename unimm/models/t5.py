"""The T5 text encoder (Raffel et al. 2020), loadable from a local Hugging Face
checkpoint, for Parti's optional T5 initialisation (Parti §2.2 initialises its
text encoder from a pretrained one).

  encoder, params = t5.load_t5_encoder("/path/to/t5-v1_1-base")
  out = encoder.apply({"params": params}, ids, mask)   # [B, S, d_model]

The directory holds config.json and model.safetensors (the layout of
`T5EncoderModel.save_pretrained`). Both T5 variants are supported: the
original ("relu": one dense ReLU MLP) and v1.1 ("gated-gelu": GEGLU with the
tanh GELU). What T5 does differently from unimm's other stacks: RMS norm
without bias, no 1/sqrt(d) attention scale, and a learned relative position
bias (bucketed, bidirectional) computed by the first layer and added to the
attention logits of every layer. The output width is T5's d_model; a model
of another width puts a projection (unimm.nn.dense) after it.
"""
import json
import math
import os
from typing import Any

from flax import traverse_util
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm import nn as unn
from unimm import parallel
from unimm.nn.attention import dot_product_attention

_FEED_FORWARD = {"relu": "relu", "gated-gelu": "geglu"}


def relative_position_buckets(length_q: int, length_k: int, num_buckets: int,
                              max_distance: int) -> np.ndarray:
  """T5's bidirectional buckets of (key - query) offsets: int [Tq, Tk]."""
  relative = np.arange(length_k)[None, :] - np.arange(length_q)[:, None]
  half = num_buckets // 2
  buckets = (relative > 0).astype(np.int32) * half
  distance = np.abs(relative)
  max_exact = half // 2
  with np.errstate(divide="ignore"):
    large = max_exact + (
        np.log(np.maximum(distance, 1) / max_exact) /
        math.log(max_distance / max_exact) * (half - max_exact)).astype(
            np.int32)
  large = np.minimum(large, half - 1)
  return buckets + np.where(distance < max_exact, distance, large)


class T5Block(nn.Module):
  """Pre-norm self-attention (with the shared position bias) + MLP."""
  d_model: int
  num_heads: int
  d_kv: int
  d_ff: int
  activation: str
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x, mask, bias):
    kw = dict(dtype=self.dtype)
    h = unn.norm_layer("rmsnorm", name="attention_norm", **kw)(x)
    q, k, v = (unn.dense((self.num_heads, self.d_kv),
                         ("embed", "heads", "head_dim"), name=n, **kw)(h)
               for n in ("q", "k", "v"))  # [B, S, N, H]
    b, s = mask.shape
    keys = jnp.broadcast_to(mask[:, None, :], (b, s, s))  # [B, S, S], as HF
    a = dot_product_attention(q, k, v, keys, bias=bias, scale=1.0)
    x = x + unn.dense(self.d_model, ("heads", "head_dim", "embed"),
                      axis=(-2, -1), name="o", **kw)(a)
    h = unn.norm_layer("rmsnorm", name="mlp_norm", **kw)(x)
    return x + unn.Mlp(self.d_model, self.d_ff, activation=self.activation,
                       name="mlp", **kw)(h)


class T5Encoder(nn.Module):
  """ids [B, S] (0 = padding) and mask bool [B, S] -> [B, S, d_model]."""
  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int
  d_kv: int
  d_ff: int
  feed_forward_proj: str = "relu"
  relative_attention_num_buckets: int = 32
  relative_attention_max_distance: int = 128
  dtype: str = "float32"

  @nn.compact
  def __call__(self, ids, mask=None):
    if self.feed_forward_proj not in _FEED_FORWARD:
      raise ValueError(f"feed_forward_proj={self.feed_forward_proj!r}; "
                       f"expected one of {sorted(_FEED_FORWARD)}.")
    mask = (ids != 0) if mask is None else mask.astype(bool)
    table = self.param(  # T5 does not scale embeddings by sqrt(d_model).
        "embedding", unn.partitioned(nn.initializers.normal(1.0),
                                     ("vocab", "embed")),
        (self.vocab_size, self.d_model))
    x = jnp.take(table, ids, axis=0).astype(jnp.dtype(self.dtype))
    s = ids.shape[1]
    buckets = relative_position_buckets(
        s, s, self.relative_attention_num_buckets,
        self.relative_attention_max_distance)
    table = self.param(
        "relative_attention_bias",
        unn.partitioned(nn.initializers.normal(1.0), (None, "heads")),
        (self.relative_attention_num_buckets, self.num_heads))
    bias = jnp.take(table, buckets, axis=0).transpose(2, 0, 1)[None]
    for i in range(self.num_layers):
      x = T5Block(self.d_model, self.num_heads, self.d_kv, self.d_ff,
                  _FEED_FORWARD[self.feed_forward_proj], self.dtype,
                  name=f"block_{i}")(x, mask, bias)
    return unn.norm_layer("rmsnorm", name="final_norm", dtype=self.dtype)(x)


def t5_config(path: str) -> dict[str, Any]:
  """T5Encoder kwargs from a Hugging Face config.json (file or directory)."""
  if os.path.isdir(path):
    path = os.path.join(path, "config.json")
  if not os.path.exists(path):
    raise ValueError(f"No T5 config at {path!r}; expected the config.json "
                     "of a Hugging Face T5 checkpoint directory.")
  with open(path) as f:
    hf = json.load(f)
  proj = hf.get("feed_forward_proj", "relu")
  if proj not in _FEED_FORWARD:
    raise ValueError(f"{path}: feed_forward_proj={proj!r} is not supported; "
                     f"expected one of {sorted(_FEED_FORWARD)}.")
  eps = hf.get("layer_norm_epsilon", 1e-6)
  if abs(eps - 1e-6) > 1e-12:
    raise ValueError(f"{path}: layer_norm_epsilon={eps}; unimm's RMS norm "
                     "uses T5's 1e-6.")
  return dict(vocab_size=hf["vocab_size"], d_model=hf["d_model"],
              num_layers=hf["num_layers"], num_heads=hf["num_heads"],
              d_kv=hf["d_kv"], d_ff=hf["d_ff"], feed_forward_proj=proj,
              relative_attention_num_buckets=hf.get(
                  "relative_attention_num_buckets", 32),
              relative_attention_max_distance=hf.get(
                  "relative_attention_max_distance", 128))


def _hf_names(kw: dict[str, Any]) -> dict[tuple[str, ...], tuple[str, Any]]:
  """unimm param path -> (HF tensor name, numpy transform of the HF array)."""
  n, h, d = kw["num_heads"], kw["d_kv"], kw["d_model"]
  heads_out = lambda w: w.T.reshape(d, n, h)  # [N*H, D] -> [D, N, H]
  names = {
      ("embedding",): ("shared.weight", lambda w: w),
      ("relative_attention_bias",): (
          "encoder.block.0.layer.0.SelfAttention.relative_attention_bias."
          "weight", lambda w: w),
      ("final_norm", "scale"): ("encoder.final_layer_norm.weight",
                                lambda w: w),
  }
  for i in range(kw["num_layers"]):
    pre = f"encoder.block.{i}.layer."
    blk = f"block_{i}"
    for p in "qkv":
      names[(blk, p, "kernel")] = (f"{pre}0.SelfAttention.{p}.weight",
                                   heads_out)
    names[(blk, "o", "kernel")] = (f"{pre}0.SelfAttention.o.weight",
                                   lambda w: w.T.reshape(n, h, d))
    names[(blk, "attention_norm", "scale")] = (f"{pre}0.layer_norm.weight",
                                               lambda w: w)
    names[(blk, "mlp_norm", "scale")] = (f"{pre}1.layer_norm.weight",
                                         lambda w: w)
    ff = f"{pre}1.DenseReluDense."
    if kw["feed_forward_proj"] == "relu":
      names[(blk, "mlp", "wi", "kernel")] = (ff + "wi.weight", lambda w: w.T)
    else:
      names[(blk, "mlp", "wi_gate", "kernel")] = (ff + "wi_0.weight",
                                                  lambda w: w.T)
      names[(blk, "mlp", "wi_up", "kernel")] = (ff + "wi_1.weight",
                                                lambda w: w.T)
    names[(blk, "mlp", "wo", "kernel")] = (ff + "wo.weight", lambda w: w.T)
  return names


def load_t5_encoder(path: str, dtype: str = "float32"
                    ) -> tuple[T5Encoder, dict[str, Any]]:
  """(T5Encoder, plain params) from a local HF T5 checkpoint directory."""
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top
  kw = t5_config(path)
  weights = os.path.join(path, "model.safetensors")
  if not os.path.exists(weights):
    raise ValueError(f"No weights at {weights!r}; expected a safetensors "
                     "checkpoint (T5EncoderModel.save_pretrained(..., "
                     "safe_serialization=True)).")
  tensors = load_file(weights)
  model = T5Encoder(dtype=dtype, **kw)
  abstract = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.ones((1, 2), jnp.int32)))
  abstract = parallel.unbox(abstract["params"])
  flat = {}
  names = _hf_names(kw)
  for path_key, leaf in traverse_util.flatten_dict(abstract).items():
    if path_key[-1] == "bias":  # T5 has no biases: the relu Mlp's are 0.
      flat[path_key] = np.zeros(leaf.shape, leaf.dtype)
      continue
    hf_name, transform = names[path_key]
    if hf_name not in tensors and hf_name == "shared.weight":
      hf_name = "encoder.embed_tokens.weight"
    if hf_name not in tensors:
      raise ValueError(f"{weights}: tensor {hf_name!r} is missing (needed "
                       f"for {'/'.join(path_key)}).")
    value = transform(np.asarray(tensors[hf_name], np.float32))
    if value.shape != leaf.shape:
      raise ValueError(
          f"{weights}: tensor {hf_name!r} has shape "
          f"{tensors[hf_name].shape}, which gives {value.shape} for "
          f"{'/'.join(path_key)}; expected {leaf.shape} from config.json.")
    flat[path_key] = value.astype(leaf.dtype)
  return model, traverse_util.unflatten_dict(flat)
