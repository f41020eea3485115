"""A trained super-resolution module (Parti's upsampler) for inference.

The frozen ViT-VQGAN decodes base-resolution ids into an image and their
code vectors; the upsampler maps (decoded image, codes) to factor x the
resolution. Training (unimm.train.upsampler_task) runs the same functions.
"""
import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm import paths
from unimm.inference import tokenizer as tokenizer_lib
from unimm.tokenizers import upsampler as upsampler_lib
from unimm.tokenizers import vit_vqgan


def to_uint8(x) -> jax.Array:
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


def decode_with_codes(tokenizer: vit_vqgan.ViTVQGAN, tokenizer_params, ids):
  """ids [B, h, w] -> (decoded [B, s, s, 3] in [0, 1], codes [B, h, w, D]),
  constants for the upsampler's gradient."""
  decoded, codes = tokenizer.apply(
      {"params": tokenizer_params}, ids,
      method=vit_vqgan.ViTVQGAN.decode_with_codes)
  # The tokenizer rounds its outputs to uint8 when it decodes for users.
  decoded = jnp.round(decoded * 255.0) / 255.0
  return jax.lax.stop_gradient(decoded), jax.lax.stop_gradient(codes)


def upsample(model: upsampler_lib.Upsampler, tokenizer: vit_vqgan.ViTVQGAN,
             params, tokenizer_params, ids):
  """ids [B, h, w] -> (decoded base [B, s, s, 3], mean [B, fs, fs, 3],
  log-scale or None), all in [0, 1] pixel units."""
  decoded, codes = decode_with_codes(tokenizer, tokenizer_params, ids)
  mu, log_scale = model.apply({"params": params}, decoded, codes)
  return decoded, mu, log_scale


@functools.lru_cache(maxsize=8)
def _jitted(model, tokenizer, from_images: bool):
  def fn(params, tokenizer_params, inputs):
    ids = inputs
    if from_images:
      ids = tokenizer.apply({"params": tokenizer_params}, inputs,
                            method=vit_vqgan.ViTVQGAN.encode)
    decoded, mu, _ = upsample(model, tokenizer, params, tokenizer_params, ids)
    return to_uint8(decoded), to_uint8(mu)
  return jax.jit(fn)


@dataclasses.dataclass
class Upsampler:
  """A trained super-resolution module and its (frozen) tokenizer."""
  model: upsampler_lib.Upsampler
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict
  step: int = 0
  path: str = ""

  @property
  def factor(self) -> int:
    return self.model.factor

  @property
  def base_size(self) -> int:
    return self.tokenizer.image_size

  def check_images(self, images, what: str = "images") -> None:
    s = self.base_size
    if tuple(images.shape[1:]) != (s, s, 3):
      raise ValueError(
          f"The upsampler takes {what} at the tokenizer's base resolution "
          f"[N, {s}, {s}, 3], got {tuple(images.shape)}; resize them to "
          f"{s}x{s} first (its tokenizer is trained at {s}).")

  def _batched(self, from_images: bool, inputs, batch_size: int):
    if int(batch_size) <= 0:
      raise ValueError(f"batch_size={batch_size}; expected > 0.")
    if not len(inputs):  # an empty batch: empty results, nothing to run
      s = self.tokenizer.image_size
      high = s * self.factor
      return (np.zeros((0, s, s, 3), np.uint8),
              np.zeros((0, high, high, 3), np.uint8))
    fn = _jitted(self.model, self.tokenizer.model, from_images)
    bases, highs = [], []
    for start in range(0, len(inputs), batch_size):
      chunk = inputs[start:start + batch_size]
      pad = batch_size - len(chunk) if len(inputs) > batch_size else 0
      if pad:  # One compiled shape for every batch.
        chunk = np.concatenate([chunk, np.repeat(chunk[-1:], pad, 0)])
      base, high = fn(self.params, self.tokenizer.params, chunk)
      bases.append(np.asarray(base)[:len(chunk) - pad])
      highs.append(np.asarray(high)[:len(chunk) - pad])
    return np.concatenate(bases), np.concatenate(highs)

  def upsample_ids(self, ids, batch_size: int = 64):
    """Tokenizer ids [N, h, w] -> (decoded base uint8 [N, s, s, 3],
    upsampled uint8 [N, s*f, s*f, 3])."""
    ids = np.asarray(ids)
    gh, gw = self.tokenizer.grid
    if ids.ndim != 3 or ids.shape[1:] != (gh, gw):
      raise ValueError(f"upsample_ids expects ids [N, {gh}, {gw}] of the "
                       f"tokenizer's grid, got {ids.shape}.")
    return self._batched(False, ids.astype(np.int32), batch_size)

  def upscale(self, images, batch_size: int = 64):
    """uint8 images [N, s, s, 3] at the base resolution -> (their tokenizer
    reconstructions [N, s, s, 3], upsampled [N, s*f, s*f, 3])."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
      raise ValueError(f"upscale expects uint8 images, got {images.dtype}.")
    self.check_images(images)
    return self._batched(True, images, batch_size)


def _same_params(a, b) -> bool:
  """Whether two parameter trees hold the same values (same tokenizer)."""
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(a) == len(b) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(a, b))


def check_same_tokenizer(upsampler: Upsampler,
                         tokenizer: tokenizer_lib.Tokenizer) -> None:
  """ValueError unless `upsampler` was trained on `tokenizer`'s codes."""
  mine = upsampler.tokenizer
  if (mine.grid != tokenizer.grid or mine.num_codes != tokenizer.num_codes
      or mine.image_size != tokenizer.image_size or
      not _same_params(mine.params, tokenizer.params)):
    raise ValueError(
        f"The upsampler in {upsampler.path!r} was trained on a tokenizer "
        f"with a {mine.grid} grid of {mine.num_codes} codes at "
        f"{mine.image_size}px; this model's tokenizer has {tokenizer.grid} "
        f"/ {tokenizer.num_codes} / {tokenizer.image_size}px (or the same "
        "shapes with other weights). Train the upsampler with "
        "tokenizer_workdir= this model's tokenizer.")


def params_init(model: upsampler_lib.Upsampler,
                tokenizer: tokenizer_lib.Tokenizer) -> checkpoints.InitFn:
  """init(rng, batch) of the params an upsampler run saves and loads."""
  gh, gw = tokenizer.grid
  dim = tokenizer.model.decoder_embed_dim

  def init(rng, batch):
    b, s = batch["image"].shape[0], tokenizer.image_size
    return {"params": model.init(
        rng, jnp.zeros((b, s, s, 3), jnp.float32),
        jnp.zeros((b, gh, gw, dim), jnp.float32))["params"]}
  return init


def load_upsampler(path: str, step: int | None = None) -> Upsampler:
  """The super-resolution module in `path` (a workdir or an export)."""
  path = checkpoints.find(path)
  step, config, meta = tokenizer_lib.saved_run(path, step, "upsampler",
                                               "an upsampler")
  model = config_lib.build_module(upsampler_lib.Upsampler, config.model)
  upsampler_lib.check_factor(model.factor)
  tokenizer = tokenizer_lib.load_dependency(path, config, meta)
  restored = checkpoints.restore(path, params_init(model, tokenizer), config,
                                 step)
  return Upsampler(model, jax.device_get(restored.params), tokenizer, config,
                   restored.step, path)


def find_upsamplers(path: str, given=None) -> dict[int, str]:
  """factor -> folder: the given ones, else upsampler_x{f}/ inside `path`
  (an export) or beside it (an end-to-end recipe's stages)."""
  candidates = list(given or [])
  if not candidates:
    parent = os.path.dirname(paths.absolute(path))
    for root in (path, parent):
      for factor in (2, 4):
        folder = os.path.join(root, f"upsampler_x{factor}")
        if checkpoints.has_checkpoints(folder):
          candidates.append(folder)
  found = {}
  for folder in candidates:
    config = checkpoints.saved_config(folder)
    tokenizer_lib.check_task(config, folder, "upsampler", "an upsampler")
    found.setdefault(int(config.model.factor), folder)
  return found
