"""The public Python API: load trained models from a workdir.

  tok = unimm.load_tokenizer("workdirs/tokenizer")
  ids = tok.encode(images)        # uint8 [N, H, W, 3] -> int32 [N, h, w]
  images = tok.decode(ids)        # -> uint8 [N, H, W, 3]
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
class TextToImageModel:
  """A trained text-to-image model (Parti): prompts in, images out."""
  task: Any
  params: Any
  config: ml_collections.ConfigDict
  step: int

  def sample(self, prompts, *, seed: int = 0, cfg_scale: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int | None = None):
    """uint8 images [N, H, W, 3] for N prompts; deterministic per seed.

    cfg_scale None uses the config's eval.cfg_scale; 0 < s mixes the
    unconditional and conditional logits as u + s (c - u) (1 = plain
    conditional sampling).
    """
    if cfg_scale is None:
      cfg_scale = self.config.get("eval", {}).get("cfg_scale", None)
    return self.task.sample(self.params, list(prompts), seed=seed,
                            cfg_scale=cfg_scale, temperature=temperature,
                            top_k=top_k, top_p=top_p, batch_size=batch_size)


def load_model(workdir: str, step: int | None = None) -> TextToImageModel:
  """Loads the generative model trained in `workdir` (latest checkpoint).

  `workdir` is a Parti run, or an end-to-end recipe's workdir
  (configs/shapes_demo.py), whose model is in its parti/ stage.
  """
  stage = os.path.join(workdir, "parti")
  if (not os.path.isdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)) and
      os.path.isdir(os.path.join(stage, trainer.CHECKPOINT_DIR))):
    workdir = stage
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "parti":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run; "
                     "load_model expects a text-to-image run (config.task "
                     "'parti'); use unimm.load_tokenizer for tokenizers.")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return TextToImageModel(task, restored.params, config, int(restored.step))
