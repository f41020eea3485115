"""A trained diffusion de-tokenizer for inference: the frozen tokenizer's
codes (or encoder tokens) -> images by flow-matching sampling
(unimm.models.diffusion), no training code.

  detok = unimm.load_detokenizer("workdirs/detok")
  images = detok.decode(ids)            # uint8 [N, S, S, 3] from codes
  images = detok.reconstruct(images)    # encode with the tokenizer, decode
  edited = detok.decode(target_ids, source=images)  # a source-image decoder

What conditions the decoder (config.condition):
  codes    the ids' code vectors as the tokenizer's own decoder sees them
           [B, h*w, D_dec] (a drop-in second decoder for Parti's and the
           interleaved model's codes);
  encoder  the tokenizer encoder's continuous tokens [B, T, D_enc] (what a
           continuous-output model regresses, as Emu's visual embeddings).
Sampling defaults are the eval's (config.eval.num_steps, cfg_scale).
"""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm.inference import settings as settings_lib
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import diffusion
from unimm.sampling import flow
from unimm.sampling import sampler as sampler_lib
from unimm.tokenizers import vit_vqgan

CONDITIONS = ("codes", "encoder")
EVAL = settings_lib.EVAL
SAMPLING_DEFAULTS = dict(num_steps=32, cfg_scale=None)


def check_condition(kind: str) -> str:
  if kind not in CONDITIONS:
    raise ValueError(f"config.condition={kind!r}; expected one of "
                     f"{CONDITIONS} (config arg condition=...).")
  return kind


def condition_shape(kind: str, tokenizer: vit_vqgan.ViTVQGAN
                    ) -> tuple[int, int]:
  """(length, width) of the condition sequence of one image."""
  check_condition(kind)
  if kind == "codes":
    return tokenizer.num_tokens, tokenizer.decoder_embed_dim
  return tokenizer.num_tokens, tokenizer.encoder_embed_dim


def conditions_of_ids(tokenizer: vit_vqgan.ViTVQGAN, tokenizer_params, ids):
  """ids [B, h, w] -> their code vectors [B, h*w, D_dec] (traceable)."""
  return tokenizer.apply({"params": tokenizer_params},
                         ids.reshape(ids.shape[0], -1),
                         method=vit_vqgan.ViTVQGAN.code_vectors)


def conditions_of_images(kind: str, tokenizer: vit_vqgan.ViTVQGAN,
                         tokenizer_params, images):
  """uint8 images [B, S, S, 3] -> the condition [B, K, D] (traceable)."""
  if check_condition(kind) == "codes":
    ids = tokenizer.apply({"params": tokenizer_params}, images,
                          method=vit_vqgan.ViTVQGAN.encode)
    return conditions_of_ids(tokenizer, tokenizer_params, ids)
  return tokenizer.apply({"params": tokenizer_params}, images,
                         method=vit_vqgan.ViTVQGAN.encoder_tokens)


def to_uint8(x) -> jax.Array:
  return jnp.round(jnp.clip(x, 0.0, 1.0) * 255.0).astype(jnp.uint8)


@functools.lru_cache(maxsize=16)
def _jitted(model: diffusion.DiffusionDecoder, num_steps: int,
            guided: bool):
  def fn(params, conditions, rng, cfg_scale, sources=None):
    return to_uint8(diffusion.sample(
        model, params, conditions, rng, num_steps=num_steps,
        cfg_scale=cfg_scale if guided else None,
        source01=None if sources is None
        else sources.astype(jnp.float32) / 255.0))
  return jax.jit(fn)


@dataclasses.dataclass
class Detokenizer:
  """A trained diffusion decoder and its (frozen) tokenizer."""
  model: diffusion.DiffusionDecoder
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict
  step: int = 0
  path: str = ""

  def __post_init__(self):
    self.settings = settings_lib.eval_settings(SAMPLING_DEFAULTS,
                                               self.config)

  @property
  def condition(self) -> str:
    return check_condition(self.config.get("condition", "codes"))

  def conditions(self, images) -> np.ndarray:
    """uint8 images [N, S, S, 3] -> their conditions [N, K, D]."""
    images = np.asarray(images)
    s = self.tokenizer.image_size
    if images.dtype != np.uint8 or images.shape[1:] != (s, s, 3):
      raise ValueError(f"Images {images.dtype} {images.shape}; expected "
                       f"uint8 [N, {s}, {s}, 3] (the tokenizer's size).")
    if not len(images):
      length, width = condition_shape(self.condition, self.tokenizer.model)
      return np.zeros((0, length, width), np.float32)
    return np.asarray(_jitted_conditions(
        self.condition, self.tokenizer.model)(
            vit_vqgan._plain_params(self.tokenizer.params), images))  # pylint: disable=protected-access

  def decode_conditions(self, conditions, *, source=None, seed: int = 0,
                        num_steps=EVAL, cfg_scale=EVAL,
                        batch_size: int = 64) -> np.ndarray:
    """Conditions [N, K, D] -> uint8 images [N, S, S, 3], sampled with
    num_steps Euler steps, guided by cfg_scale (None: unguided); the
    defaults are the eval's. Batches of batch_size share one compile.
    source: uint8 [N, S, S, 3], the images being edited, for a decoder
    trained with them (SEED-X; config.model.source_image); None draws
    from the condition alone."""
    num_steps = flow.check_steps(
        settings_lib.resolve(num_steps, self.settings, "num_steps"))
    cfg_scale = settings_lib.resolve(cfg_scale, self.settings, "cfg_scale")
    cfg_scale = None if cfg_scale in (None, "") else float(cfg_scale)
    if (isinstance(batch_size, bool) or not isinstance(batch_size, int)
        or batch_size <= 0):
      raise ValueError(f"batch_size={batch_size!r}; expected an int > 0.")
    conditions = np.asarray(conditions, np.float32)
    s = self.tokenizer.image_size
    if source is not None:
      source = np.asarray(source)
      if not self.model.source_image:
        raise ValueError(
            f"source= given, but the de-tokenizer in {self.path!r} was "
            "trained without source images; drop source=, or train one "
            "with config arg source=1 (configs/detokenizer_shapes.py).")
      if source.dtype != np.uint8 or source.shape != (len(conditions), s,
                                                     s, 3):
        raise ValueError(
            f"source images {source.dtype} {source.shape}; expected uint8 "
            f"[{len(conditions)}, {s}, {s}, 3], one per condition.")
    if not len(conditions):
      return np.zeros((0, s, s, 3), np.uint8)
    fn = _jitted(self.model, num_steps, cfg_scale is not None)
    rng = sampler_lib.seed_key(seed)
    out = []
    for i, start in enumerate(range(0, len(conditions), batch_size)):
      chunk = conditions[start:start + batch_size]
      sources = None if source is None else source[start:start + batch_size]
      pad = batch_size - len(chunk) if len(conditions) > batch_size else 0
      if pad:  # one compiled shape for every batch
        chunk, sources = (None if x is None else np.concatenate(
            [x, np.repeat(x[-1:], pad, 0)]) for x in (chunk, sources))
      images = fn(self.params, chunk, jax.random.fold_in(rng, i),
                  jnp.float32(cfg_scale or 1.0), sources)
      out.append(np.asarray(images)[:len(chunk) - pad])
    return np.concatenate(out)

  def decode(self, ids, **kwargs) -> np.ndarray:
    """Tokenizer ids [N, h, w] -> uint8 images (config.condition must be
    "codes"); kwargs (source=, seed=, ...) as decode_conditions."""
    if self.condition != "codes":
      raise ValueError(f"decode(ids) needs a decoder conditioned on codes; "
                       f"this one is conditioned on {self.condition!r}: "
                       "use reconstruct(images) or decode_conditions.")
    ids = np.asarray(ids)
    gh, gw = self.tokenizer.grid
    if ids.ndim != 3 or ids.shape[1:] != (gh, gw):
      raise ValueError(f"ids of shape {ids.shape}; expected [N, {gh}, {gw}] "
                       "(the tokenizer's grid).")
    if not len(ids):
      s = self.tokenizer.image_size
      return np.zeros((0, s, s, 3), np.uint8)
    conditions = np.asarray(_jitted_id_conditions(self.tokenizer.model)(
        vit_vqgan._plain_params(self.tokenizer.params),  # pylint: disable=protected-access
        ids.astype(np.int32)))
    return self.decode_conditions(conditions, **kwargs)

  def reconstruct(self, images, **kwargs) -> np.ndarray:
    """uint8 images -> their conditions -> decoded uint8 images; kwargs as
    decode_conditions."""
    return self.decode_conditions(self.conditions(images), **kwargs)


@functools.lru_cache(maxsize=4)
def _jitted_conditions(kind: str, tokenizer: vit_vqgan.ViTVQGAN):
  return jax.jit(functools.partial(conditions_of_images, kind, tokenizer))


@functools.lru_cache(maxsize=4)
def _jitted_id_conditions(tokenizer: vit_vqgan.ViTVQGAN):
  return jax.jit(functools.partial(conditions_of_ids, tokenizer))


def build_model(config, tokenizer: tokenizer_lib.Tokenizer
                ) -> diffusion.DiffusionDecoder:
  """The decoder of config.model, at the tokenizer's image size and with
  the condition it gives (config.condition); a config.model that names
  another image_size / condition_length / condition_dim is a ValueError."""
  length, width = condition_shape(config.get("condition", "codes"),
                                  tokenizer.model)
  derived = dict(image_size=tokenizer.image_size, condition_length=length,
                 condition_dim=width)
  fields = config.model.to_dict()
  for key, value in derived.items():
    if fields.get(key) not in (None, value):
      raise ValueError(
          f"config.model.{key}={fields[key]} but the tokenizer "
          f"(config.tokenizer_workdir) with condition="
          f"{config.get('condition', 'codes')!r} gives {value}; leave it "
          "out (it is derived from the tokenizer).")
  return config_lib.build_module(diffusion.DiffusionDecoder,
                                 {**fields, **derived})


def params_init(model: diffusion.DiffusionDecoder) -> checkpoints.InitFn:
  """init(rng, batch) of the params a de-tokenizer run saves and loads."""

  def init(rng, batch):
    b, s = batch["image"].shape[0], model.image_size
    x = jnp.zeros((b, s, s, model.channels), jnp.float32)
    return {"params": model.init(
        rng, x, jnp.zeros((b,), jnp.float32),
        jnp.zeros((b, model.condition_length, model.condition_dim),
                  jnp.float32), None,
        x if model.source_image else None)["params"]}
  return init


def load_detokenizer(path: str, step: int | None = None) -> Detokenizer:
  """The diffusion de-tokenizer in `path` (a workdir or an export)."""
  path = checkpoints.find(path)
  step, config, meta = tokenizer_lib.saved_run(path, step, "detokenizer",
                                               "a de-tokenizer")
  tokenizer = tokenizer_lib.load_dependency(path, config, meta)
  model = build_model(config, tokenizer)
  restored = checkpoints.restore(path, params_init(model), config, step)
  return Detokenizer(model, jax.device_get(restored.params), tokenizer,
                     config, restored.step, path)
