"""TFDS builder "unimm_shapes": the embedded shapes world, built offline.

Every example is rendered by `unimm.data.shapes.generate`, so the data set
needs no download and its ground truth (the scene) is stored next to the
image and caption:

  image:   uint8 [S, S, 3], PNG
  caption: text
  scene:   text, the `shapes.Scene` as JSON (objects and relation)

Builder configs, one per image size (examples per split):

  name         train   validation   test
  "32"         50000   2000         2000
  "64"         50000   2000         2000
  "128"        50000   2000         2000
  "256"        20000   2000         2000
  "<S>_small"    512    128          128   (tests, CI, laptop smoke runs)
  "32_large"  500000   2000         2000   (long text-to-image runs)

Rendering + PNG encoding costs ~0.25 ms per example at 32px and ~1.7 ms at
256px on one core: "32" builds in ~15-20 s (34 MB) and "256" in ~50 s
(43 MB) on a busy 2-core machine; 256px keeps 20k examples to bound that.
"32_large" is "32" with ten times the training examples (its first 50,000
are "32"'s, and its validation and test splits are the same), for text-to-
image runs long enough to overfit 50,000 pairs; it built in 149 s (311 MB)
with a training job sharing the 2 cores.

Example `i` of a split is example `i % CHUNK_SIZE` of
`shapes.generate(..., seed=chunk_seed(split, i // CHUNK_SIZE))`: splits
are rendered in independent chunks (in parallel worker processes when the
split is large) and stored in order (`disable_shuffling`), so
`data_source[split][i]` is reproducible from the seed alone. Splits use
different seeds, so validation and test are held out from train (the world
is small, so an individual scene may still repeat by chance).

Build ahead of time (e.g. once into a data_dir shared by all hosts):

  python -m unimm.tools.build_shapes --image_size 32 [--data_dir DIR]
"""
import concurrent.futures
import dataclasses
import fcntl
import io
import json
import multiprocessing
import os
import time
from typing import Any, Iterator

from absl import logging
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from unimm.data import shapes

NAME = "unimm_shapes"
CHUNK_SIZE = 1000
IMAGE_SIZES = (32, 64, 128, 256)
SPLITS = ("train", "validation", "test")
# Split -> seed stream; chunk seeds are derived from (salt, split seed, chunk).
_SPLIT_SEEDS = {"train": 1, "validation": 2, "test": 3}
_SEED_SALT = 0x5A4B3
# Splits with at least this many examples are rendered in worker processes.
_PARALLEL_MIN_EXAMPLES = 8 * CHUNK_SIZE


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Image size and number of examples per split."""
  image_size: int = 32
  num_train: int = 50_000
  num_validation: int = 2_000
  num_test: int = 2_000

  def num_examples(self, split: str) -> int:
    return {"train": self.num_train, "validation": self.num_validation,
            "test": self.num_test}[split]


# Variant -> {image size: (train, validation = test) examples}; "" is the
# full data set of every size.
VARIANTS = {
    "": {32: (50_000, 2_000), 64: (50_000, 2_000), 128: (50_000, 2_000),
         256: (20_000, 2_000)},
    "small": {size: (512, 128) for size in IMAGE_SIZES},
    "large": {32: (500_000, 2_000)},
}


def _configs() -> list[ShapesConfig]:
  configs = []
  for size in IMAGE_SIZES:
    for variant, sizes in VARIANTS.items():
      if size in sizes:
        num_train, num_eval = sizes[size]
        configs.append(ShapesConfig(
            name=config_name(size, variant),
            description=f"{size}x{size} shapes scenes"
            + (f", {variant}." if variant else "."),
            image_size=size, num_train=num_train, num_validation=num_eval,
            num_test=num_eval))
  return configs


def config_name(image_size: int, variant: str = "") -> str:
  """The builder config for `image_size` and `variant` ("", "small" or
  "large"); ValueError for an unsupported pair."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown shapes variant {variant!r}; expected one of "
                     f"{sorted(VARIANTS)}.")
  if image_size not in VARIANTS[variant]:
    kind = f"{variant} " if variant else ""
    raise ValueError(
        f"The {kind}shapes data set has no {image_size}x{image_size} "
        f"variant; expected config.data.image_size in "
        f"{sorted(VARIANTS[variant])}.")
  return f"{image_size}_{variant}" if variant else str(image_size)


def chunk_seed(split: str, chunk_index: int) -> int:
  """The `shapes.generate` seed of chunk `chunk_index` of `split`."""
  state = np.random.SeedSequence(
      [_SEED_SALT, _SPLIT_SEEDS[split], chunk_index]).generate_state(1)
  return int(state[0])


def scene_to_json(scene: shapes.Scene) -> str:
  """Compact JSON of a scene; `shapes.scene_from_json` inverts it."""
  return json.dumps(dataclasses.asdict(scene), sort_keys=True,
                    separators=(",", ":"))


def _encode_png(image: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


def render_chunk(split: str, chunk_index: int, num: int,
                 image_size: int) -> list[dict[str, Any]]:
  """Examples [chunk_index * CHUNK_SIZE, ... + num) of `split`, encoded."""
  images, captions, scenes = shapes.generate(
      num, seed=chunk_seed(split, chunk_index), image_size=image_size)
  return [{"image": _encode_png(image), "caption": caption,
           "scene": scene_to_json(scene)}
          for image, caption, scene in zip(images, captions, scenes)]


def _chunks(num_examples: int) -> list[tuple[int, int]]:
  """(chunk_index, size) covering `num_examples` in order."""
  return [(c, min(CHUNK_SIZE, num_examples - c * CHUNK_SIZE))
          for c in range(-(-num_examples // CHUNK_SIZE))]


def _num_workers(num_examples: int) -> int:
  if num_examples < _PARALLEL_MIN_EXAMPLES:
    return 0
  return min(os.cpu_count() or 1, 16, -(-num_examples // CHUNK_SIZE))


class UnimmShapes(tfds.core.GeneratorBasedBuilder,
                  # `python -m` (and its spawned workers) run this file as
                  # __main__ / __mp_main__ besides importing it: register
                  # the package module's class only.
                  skip_registration=__name__ in ("__main__", "__mp_main__")):
  """Procedural shapes scenes with captions and ground-truth scenes."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = _configs()

  def __init__(self, *, file_format=None, **kwargs):
    # ArrayRecord: random access for tfds.data_source and grain.
    super().__init__(
        file_format=file_format or tfds.core.FileFormat.ARRAY_RECORD, **kwargs)

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    # TFDS finds this through importlib_resources, which etils only pulls in
    # with its "epath" extra; the module file is the same answer.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    return self.dataset_info_from_configs(
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3),
                                         encoding_format="png"),
            "caption": tfds.features.Text(),
            "scene": tfds.features.Text(),
        }),
        supervised_keys=None,
        # Stored in generation order: example i is reproducible from seeds.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download: the world is procedural.
    return {split: self._generate_examples(split) for split in SPLITS}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    config = self.builder_config
    num_examples = config.num_examples(split)
    chunks = _chunks(num_examples)
    workers = _num_workers(num_examples)
    start = time.time()
    if workers:
      # spawn, not fork: the parent may already run TF / JAX threads.
      context = multiprocessing.get_context("spawn")
      with concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=context) as pool:
        rendered = pool.map(render_chunk, *zip(*[
            (split, c, n, config.image_size) for c, n in chunks]))
        yield from self._keyed(rendered)
    else:
      yield from self._keyed(
          render_chunk(split, c, n, config.image_size) for c, n in chunks)
    logging.info("unimm_shapes/%s %s: rendered %d examples in %.1fs "
                 "(%d workers).", config.name, split, num_examples,
                 time.time() - start, workers)

  @staticmethod
  def _keyed(rendered_chunks) -> Iterator[tuple[int, dict]]:
    index = 0
    for chunk in rendered_chunks:
      for example in chunk:
        yield index, example
        index += 1


def default_data_dir() -> str:
  """$UNIMM_DATA_DIR, else ~/.cache/unimm/tfds."""
  return os.environ.get("UNIMM_DATA_DIR") or os.path.join(
      os.path.expanduser("~"), ".cache", "unimm", "tfds")


def shapes_builder(image_size: int, data_dir: str | None = None, *,
                   variant: str = "") -> UnimmShapes:
  """The (possibly not yet prepared) builder for `image_size`, `variant`."""
  return UnimmShapes(config=config_name(image_size, variant),
                     data_dir=data_dir or default_data_dir())


def build_shapes(image_size: int, data_dir: str | None = None, *,
                 variant: str = "") -> str:
  """Builds unimm_shapes/<image_size> into `data_dir` unless already there.

  Idempotent (a prepared data set is reused) and offline; TFDS shows a
  progress bar per split. Returns the data_dir used.
  """
  builder = shapes_builder(image_size, data_dir, variant=variant)
  if not builder.is_prepared():
    # Several processes on one machine (launch/local.sh --processes N) share
    # the directory: one builds, the others wait on the lock and reuse it.
    root = os.fspath(builder.data_dir_root)
    os.makedirs(root, exist_ok=True)
    lock_path = os.path.join(root, f".{NAME}_{builder.builder_config.name}.lock")
    with open(lock_path, "w") as lock:
      fcntl.flock(lock, fcntl.LOCK_EX)
      builder = shapes_builder(image_size, data_dir, variant=variant)
      if not builder.is_prepared():
        start = time.time()
        logging.info("Building %s/%s into %s ...", NAME,
                     builder.builder_config.name, builder.data_dir_root)
        builder.download_and_prepare(
            download_config=tfds.download.DownloadConfig(
                try_download_gcs=False))
        logging.info("Built %s/%s in %.1fs.", NAME,
                     builder.builder_config.name, time.time() - start)
  return os.fspath(builder.data_dir_root)
