"""The task registry: config.task -> the task module the trainer drives."""
import ml_collections


def _vit_vqgan(config):
  from unimm.train.vqgan_task import ViTVQGANTask  # pylint: disable=g-import-not-at-top
  return ViTVQGANTask(config)


def _parti(config):
  from unimm.train.parti_task import ParTask  # pylint: disable=g-import-not-at-top
  return ParTask(config)


def _interleaved(config):
  from unimm.train.interleaved_task import InterleavedTask  # pylint: disable=g-import-not-at-top
  return InterleavedTask(config)


def _upsampler(config):
  from unimm.train.upsampler_task import UpsamplerTask  # pylint: disable=g-import-not-at-top
  return UpsamplerTask(config)


TASKS = {
    "vit_vqgan": _vit_vqgan,
    "parti": _parti,
    "upsampler": _upsampler,
    "interleaved": _interleaved,
}


def per_host_batch_size(config: ml_collections.ConfigDict,
                        process_count: int) -> int:
  """config.data.batch_size (global) split over the hosts, or a ValueError."""
  batch_size = config.data.batch_size
  if batch_size % process_count:
    raise ValueError(f"config.data.batch_size={batch_size} is not divisible "
                     f"by the {process_count} processes.")
  return batch_size // process_count


def get_task(config: ml_collections.ConfigDict):
  """Builds the task named by config.task."""
  name = config.get("task")
  if name not in TASKS:
    raise ValueError(f"Unknown config.task {name!r}; expected one of "
                     f"{sorted(TASKS)}.")
  return TASKS[name](config)
