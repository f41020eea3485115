"""The task registry: config.task -> the task the trainer drives."""
import ml_collections

from unimm.train.detokenizer_task import DetokenizerTask
from unimm.train.interleaved_task import InterleavedTask
from unimm.train.parti_task import ParTask
from unimm.train.upsampler_task import UpsamplerTask
from unimm.train.vqgan_task import ViTVQGANTask

TASKS = {
    "vit_vqgan": ViTVQGANTask,
    "parti": ParTask,
    "upsampler": UpsamplerTask,
    "interleaved": InterleavedTask,
    "detokenizer": DetokenizerTask,
}


def get_task(config: ml_collections.ConfigDict):
  """Builds the task named by config.task."""
  name = config.get("task")
  if name not in TASKS:
    raise ValueError(f"Unknown config.task {name!r}; expected one of "
                     f"{sorted(TASKS)}.")
  return TASKS[name](config)
