"""The public Python API: load trained models from a workdir.

  tok = unimm.load_tokenizer("workdirs/tokenizer")
  ids = tok.encode(images)        # uint8 [N, H, W, 3] -> int32 [N, h, w]
  images = tok.decode(ids)        # -> uint8 [N, H, W, 3]
  model = unimm.load_model("workdirs/demo")
  images = model.sample(prompts, seed=0, upscale=4)   # -> [N, 4H, 4W, 3]
  up = unimm.load_upsampler("workdirs/upsampler_x4")
  base, high = up.upscale(images)  # images at the tokenizer's resolution
"""
import dataclasses
import os
from typing import Any

import jax
import ml_collections

from unimm.tokenizers import vit_vqgan
from unimm.train import tasks
from unimm.train import trainer


def saved_config(workdir: str, step: int | None = None
                 ) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (stored with its checkpoints)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = trainer.checkpoint_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(
          f"{workdir!r} has no checkpoint under "
          f"{os.path.join(workdir, trainer.CHECKPOINT_DIR)}; train it first "
          "(python -m unimm.main --config ... --workdir DIR).")
    saved = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return ml_collections.ConfigDict(dict(saved["config"]))


def _local_mesh_config(config):
  config = ml_collections.ConfigDict(config.to_dict())
  # Load onto this host's devices, whatever mesh it was trained on.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config


@dataclasses.dataclass
class Tokenizer:
  """A trained ViT-VQGAN: encode images to ids and decode ids to images."""
  model: vit_vqgan.ViTVQGAN
  params: Any
  config: ml_collections.ConfigDict
  step: int

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


def load_tokenizer(workdir: str, step: int | None = None) -> Tokenizer:
  """Loads the ViT-VQGAN trained in `workdir` (latest checkpoint by default)."""
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "vit_vqgan":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run, not a "
                     "tokenizer (config.task must be 'vit_vqgan').")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  params = jax.device_get(restored.params["generator"])
  return Tokenizer(task.model, params, config, int(restored.step))


@dataclasses.dataclass
class Upsampler:
  """A trained super-resolution module (Parti's upsampler) and its tokenizer."""
  task: Any
  params: Any
  model_state: Any
  config: ml_collections.ConfigDict
  step: int
  workdir: str

  @property
  def factor(self) -> int:
    return self.task.factor

  @property
  def base_size(self) -> int:
    return self.task.base_size

  @property
  def tokenizer(self) -> Tokenizer:
    return self.task.tokenizer

  def upsample_ids(self, ids):
    """Tokenizer ids [N, h, w] -> (decoded uint8 [N, s, s, 3], upsampled
    uint8 [N, s*factor, s*factor, 3])."""
    return self.task.upsample_ids(self.params, self.model_state, ids)

  def upscale(self, images):
    """uint8 [N, s, s, 3] at the tokenizer's resolution -> (their tokenizer
    reconstructions, upsampled uint8 [N, s*factor, s*factor, 3])."""
    return self.task.upscale(self.params, self.model_state, images)


def load_upsampler(workdir: str, step: int | None = None) -> Upsampler:
  """Loads the super-resolution module trained in `workdir`."""
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "upsampler":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run, not an "
                     "upsampler (configs/upsampler_shapes.py).")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return Upsampler(task, restored.params, restored.model_state, config,
                   int(restored.step), workdir)


@dataclasses.dataclass
class TextToImageModel:
  """A trained text-to-image model (Parti): prompts in, images out."""
  task: Any
  params: Any
  config: ml_collections.ConfigDict
  step: int
  upsamplers: dict[int, str] = dataclasses.field(default_factory=dict)

  def sample(self, prompts, *, seed: int = 0, cfg_scale: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int | None = None, upscale: int = 1,
             return_base: bool = False):
    """uint8 images [N, H, W, 3] for N prompts; deterministic per seed.

    cfg_scale None uses the config's eval.cfg_scale; 0 < s mixes the
    unconditional and conditional logits as u + s (c - u) (1 = plain
    conditional sampling). upscale 2 or 4 runs the matching upsampler on
    the sampled tokens (Parti's super-resolution stage) and returns images
    at upscale x the tokenizer's resolution (with return_base, the pair
    (base images, upscaled images)).
    """
    if cfg_scale is None:
      cfg_scale = self.config.get("eval", {}).get("cfg_scale", None)
    upsampler = self.upsampler(upscale) if upscale != 1 else None
    kwargs = dict(seed=seed, cfg_scale=cfg_scale, temperature=temperature,
                  top_k=top_k, top_p=top_p, batch_size=batch_size)
    if upsampler is None:
      return self.task.sample(self.params, list(prompts), **kwargs)
    ids = self.task.sample_ids(self.params, list(prompts), **kwargs)
    h, w = self.task.image_tokenizer.grid
    base, high = upsampler.upsample_ids(ids.reshape(-1, h, w))
    return (base, high) if return_base else high

  def upsampler(self, factor: int) -> Upsampler:
    """The loaded upsampler for `factor` (ValueError naming the fix)."""
    if factor not in self.upsamplers:
      raise ValueError(
          f"upscale={factor} but this model has upsamplers for "
          f"{sorted(self.upsamplers) or 'no factors'} "
          f"({self.upsamplers or 'none found'}); use one of "
          f"{[1] + sorted(self.upsamplers)}, or train one (python -m "
          f"unimm.main --config configs/upsampler_shapes.py:factor={factor} "
          f"--workdir DIR) and pass load_model(..., upsamplers=[DIR]) "
          "(--upsampler_workdir DIR).")
    cache = self.__dict__.setdefault("_loaded_upsamplers", {})
    if factor not in cache:
      upsampler = load_upsampler(self.upsamplers[factor])
      tokenizer = self.task.image_tokenizer
      if (upsampler.tokenizer.grid != tokenizer.grid or
          upsampler.tokenizer.num_codes != tokenizer.num_codes or
          upsampler.base_size != tokenizer.image_size):
        raise ValueError(
            f"The upsampler in {self.upsamplers[factor]!r} was trained on a "
            f"tokenizer with a {upsampler.tokenizer.grid} grid of "
            f"{upsampler.tokenizer.num_codes} codes at "
            f"{upsampler.base_size}px; this model's tokenizer has "
            f"{tokenizer.grid} / {tokenizer.num_codes} / "
            f"{tokenizer.image_size}px. Train the upsampler with "
            "tokenizer_workdir= this model's tokenizer_workdir.")
      cache[factor] = upsampler
    return cache[factor]


def _find_upsamplers(workdir: str, given) -> dict[int, str]:
  """factor -> workdir: the given ones, else a recipe's upsampler_x{f}/."""
  found = {}
  candidates = list(given or [])
  if not candidates:
    parent = os.path.dirname(os.path.abspath(workdir))
    for root in (workdir, parent):
      for factor in (2, 4):
        path = os.path.join(root, f"upsampler_x{factor}")
        if os.path.isdir(os.path.join(path, trainer.CHECKPOINT_DIR)):
          candidates.append(path)
  for path in candidates:
    config = saved_config(path)
    if config.get("task") != "upsampler":
      raise ValueError(f"{path!r} holds a {config.get('task')!r} run, not an "
                       "upsampler.")
    found.setdefault(int(config.model.factor), path)
  return found


def model_workdir(workdir: str) -> str:
  """An end-to-end recipe's parti/ stage, or `workdir` itself."""
  stage = os.path.join(workdir, "parti")
  if (not os.path.isdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)) and
      os.path.isdir(os.path.join(stage, trainer.CHECKPOINT_DIR))):
    return stage
  return workdir


def load_model(workdir: str, step: int | None = None, *,
               upsamplers=None) -> TextToImageModel:
  """Loads the generative model trained in `workdir` (latest checkpoint).

  `workdir` is a Parti run, or an end-to-end recipe's workdir
  (configs/shapes_demo.py), whose model is in its parti/ stage.
  `upsamplers`: upsampler workdirs for sample(..., upscale=f); by default
  the recipe's upsampler_x2/ and upsampler_x4/ stages when present.
  """
  workdir = model_workdir(workdir)
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "parti":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run; "
                     "load_model expects a text-to-image run (config.task "
                     "'parti'); use unimm.load_tokenizer for tokenizers.")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return TextToImageModel(task, restored.params, config, int(restored.step),
                          _find_upsamplers(workdir, upsamplers))
