"""A trained ViT-VQGAN for inference: images <-> ids, no training code."""
import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm.models import image_input as image_input_lib
from unimm.tokenizers import text as text_lib
from unimm.tokenizers import vit_vqgan


@dataclasses.dataclass
class Tokenizer:
  """A trained ViT-VQGAN: encode images to ids and decode ids to images."""
  model: vit_vqgan.ViTVQGAN
  params: Any  # the generator's params (host arrays)
  config: ml_collections.ConfigDict
  step: int
  path: str = ""

  @property
  def image_size(self) -> int:
    return self.model.image_size

  @property
  def grid(self) -> tuple[int, int]:
    return self.model.grid

  @property
  def num_codes(self) -> int:
    return self.model.num_codes

  def encode(self, images):
    """uint8 [N, H, W, 3] at image_size -> int32 ids [N, h, w]."""
    return vit_vqgan.encode_images(self.model, self.params, images)

  def decode(self, ids):
    """int ids [N, h, w] in [0, num_codes) -> uint8 images [N, H, W, 3]."""
    return vit_vqgan.decode_ids(self.model, self.params, ids)

  def code_table(self) -> np.ndarray:
    """Every code's vector as the decoder reads it, float [num_codes,
    D_dec]: row c for code c (the diffusion de-tokenizer's condition
    "codes", what the interleaved model's image_output "embeddings"
    regresses)."""
    ids = jnp.arange(self.num_codes, dtype=jnp.int32)[None]
    return np.asarray(self.model.apply(
        {"params": vit_vqgan._plain_params(self.params)}, ids,  # pylint: disable=protected-access
        method=vit_vqgan.ViTVQGAN.code_vectors)[0])

  def reader_features(self, reads, patch_size: int):
    """reader_features with this tokenizer's frozen params (host arrays in,
    a device array out)."""
    return _jitted_reader_features(self.model, patch_size)(
        vit_vqgan._plain_params(self.params), jnp.asarray(reads))


def reader_features(model: vit_vqgan.ViTVQGAN, params, reads,
                    patch_size: int):
  """What the interleaved model's resampler reads (image_input="resampler"):
  rows of pixel patches uint8 [B, R, p*p*3], whole images of
  model.image_size one after another (as packed rows carry them) -> the
  frozen encoder's tokens [B, R / n * T, D_enc] (n patches and T encoder
  tokens per image). Traceable: the train step runs it on the frozen
  params it carries."""
  b, r, f = reads.shape
  side = model.image_size // patch_size
  n = side * side
  if r % n or f != patch_size * patch_size * model.channels:
    raise ValueError(
        f"Reads of shape {reads.shape} are not whole {model.image_size}px "
        f"images in {patch_size}px patches ({n} patches of "
        f"{patch_size * patch_size * model.channels} values each); re-pack "
        "the rows for this tokenizer.")
  images = image_input_lib.unpatchify(
      reads.reshape(b * (r // n), n, f), (side, side), patch_size)
  tokens = model.apply({"params": params}, images,
                       method=vit_vqgan.ViTVQGAN.encoder_tokens)
  return jax.lax.stop_gradient(tokens.reshape(b, -1, tokens.shape[-1]))


@functools.lru_cache(maxsize=8)
def _jitted_reader_features(model: vit_vqgan.ViTVQGAN, patch_size: int):
  return jax.jit(lambda params, reads: reader_features(model, params, reads,
                                                       patch_size))


def check_task(config, path: str, task: str, what: str) -> None:
  """ValueError unless the run in `path` is a `task` run."""
  if config.get("task") != task:
    raise ValueError(f"{path!r} holds a {config.get('task')!r} run, not "
                     f"{what} (its config.task must be {task!r}).")


def saved_run(path: str, step: int | None, task: str, what: str):
  """(step, config, meta) of the `task` run in `path` (check_task), its
  mesh fitted to this host's devices: what every loader starts from."""
  step, config, meta = checkpoints.saved(path, step)
  config = checkpoints.local_mesh_config(config)
  check_task(config, path, task, what)
  return step, config, meta


def params_init(model: vit_vqgan.ViTVQGAN) -> checkpoints.InitFn:
  """init(rng, batch) of the params a tokenizer run saves and loads."""
  def init(rng, batch):
    images = jnp.zeros(batch["image"].shape, jnp.float32)
    return {"params": {"generator": model.init(
        {"params": rng, "dropout": rng}, images)["params"]}}
  return init


def load_tokenizer(path: str, step: int | None = None) -> Tokenizer:
  """The ViT-VQGAN trained in `path` (a workdir or an export; latest step)."""
  path = checkpoints.find(path)
  config = checkpoints.local_mesh_config(checkpoints.saved_config(path, step))
  check_task(config, path, "vit_vqgan", "a tokenizer")
  model = config_lib.build_module(vit_vqgan.ViTVQGAN, config.model)
  restored = checkpoints.restore(path, params_init(model), config, step)
  params = jax.device_get(restored.params["generator"])
  return Tokenizer(model, params, config, restored.step, path)


def fingerprint(tokenizer: Tokenizer) -> str:
  """What a run that uses this tokenizer records of it: a checksum of its
  parameters (the same for a workdir and its export)."""
  return checkpoints.params_checksum(tokenizer.params)


def load_dependency(path: str, config, meta) -> Tokenizer:
  """The image tokenizer a run in `path` names (config.tokenizer_workdir),
  found from any directory and checked against the fingerprint the run
  recorded."""
  folder = checkpoints.resolve_path(config.get("tokenizer_workdir") or "",
                                    path, meta, "tokenizer_workdir")
  tokenizer = load_tokenizer(folder)
  checkpoints.check_dependency(meta, "tokenizer_workdir",
                               fingerprint(tokenizer), folder, path)
  return tokenizer


def load_text_dependency(path: str, text_path: str,
                         meta) -> text_lib.TextTokenizer:
  """The SentencePiece model a run in `path` names, found and checked like
  load_dependency's tokenizer."""
  text_path = checkpoints.resolve_path(text_path, path, meta,
                                       "text_tokenizer")
  tokenizer = text_lib.TextTokenizer.load(text_path)
  checkpoints.check_dependency(
      meta, "text_tokenizer",
      checkpoints.text_fingerprint(tokenizer.model_proto), text_path, path)
  return tokenizer
