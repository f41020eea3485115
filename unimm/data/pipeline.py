"""grain input pipelines: shard per host, shuffle, repeat, batch, checkpoint.

Every pipeline is one `grain.MapDataset` chain over a random-access source:

  source ─► host shard ─► global shuffle (new order every epoch) ─► repeat
         ─► per-example transform ─► batch ─► IterDataset [─► mp_prefetch]

Random access makes the iterator state tiny (a position), so
`iterator.get_state()` / `set_state()` resume exactly, and the order depends
only on (seed, process_index, process_count), never on worker count.

`image_text_dataset` reads image/caption data sets through TFDS'
`data_source` (ArrayRecord): source "shapes" (the embedded unimm_shapes
data set, built offline on first use), "shapes_small" (its 512-example
variant for tests and smoke runs), "shapes_large" (500,000 training
examples at 32 px, for long text-to-image runs), or a directory written by
`python -m unimm.tools.convert`. `batched_dataset` is the generic part, for
any random-access source (e.g. pre-tokenised shards).
"""
import functools
from typing import Any, Callable, Mapping, Sequence

from absl import logging
from etils import epath
import grain
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds

from unimm.data import convert
from unimm.data import tfds_shapes
from unimm.progress import Progress

# Source name -> unimm_shapes variant (tfds_shapes.VARIANTS).
SHAPES_SOURCES = {"shapes": "", "shapes_small": "small",
                  "shapes_large": "large"}


def stack_examples(examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """Batches dicts: arrays are stacked, strings become object arrays [B]."""
  batch = {}
  for key in examples[0]:
    values = [example[key] for example in examples]
    if isinstance(values[0], Mapping):
      batch[key] = stack_examples(values)
    elif isinstance(values[0], (str, bytes)):
      strings = np.empty(len(values), dtype=object)
      strings[:] = values
      batch[key] = strings
    else:
      batch[key] = np.stack([np.asarray(value) for value in values])
  return batch


class InMemorySource:
  """A random-access source read once, parsed, and then served from memory.

  For data sets that fit in host memory (the 50,000 32x32 shapes examples:
  about 150 MB of pixels). Decoding a shapes record takes ~0.27 ms, so a
  batch of 32 costs ~9 ms of CPU, which on 2 cores the tiny tokenizer's
  36 ms train step shares; read once here (~6 s), batches cost only
  their stacking. Every host holds the whole source (its shard is taken
  after). Records are the same as the wrapped source's through
  `transform`, so batches and resumption are unchanged.
  """

  def __init__(self, source, transform: Callable[[Any], Any] | None = None,
               *, name: str = "data", chunk: int = 1024):
    total, records = len(source), []
    progress = Progress(total, what=f"{name}: records read into memory")
    read = getattr(source, "__getitems__", None)
    for low in range(0, total, chunk):
      indices = list(range(low, min(total, low + chunk)))
      chunk_records = (read(indices) if read is not None
                       else [source[i] for i in indices])
      records.extend(chunk_records if transform is None
                     else [transform(r) for r in chunk_records])
      progress.update(len(records))
    self._records = records

  def __len__(self) -> int:
    return len(self._records)

  def __getitem__(self, index):
    return self._records[index]


def _shuffle_seed(seed: int) -> int:
  # grain reshuffles epoch e with seed + e; hashing the user seed keeps
  # runs with seeds s and s + 1 from sharing permutations one epoch apart.
  return int(np.random.SeedSequence([seed, 0x5EED]).generate_state(1)[0])


def batched_dataset(
    source: grain.sources.RandomAccessDataSource | Sequence[Any],
    *,
    batch_size: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    transform: Callable[[Any], Any] | None = None,
    drop_remainder: bool = True,
    worker_count: int = 0,
    worker_buffer_size: int = 2,
    read_threads: int = 4,
) -> grain.IterDataset:
  """Per-host batches over any random-access source (len + __getitem__).

  Args:
    source: random-access records (a grain/TFDS data source or a sequence).
    batch_size: examples per batch on this host.
    shuffle: shuffle globally, with a new order every epoch.
    seed: shuffle seed (same seed, same order).
    num_epochs: passes over the data; None repeats forever.
    process_index: this host, in [0, process_count).
    process_count: number of hosts. Host p reads records p, p + P, ... of the
      first len(source) // P * P records, so shards are disjoint and equal in
      size (up to P - 1 trailing records are never read).
    transform: per-record function applied before batching.
    drop_remainder: drop a final partial batch.
    worker_count: > 0 runs the pipeline in that many worker processes;
      batches are the same for every worker_count.
    worker_buffer_size: batches buffered per worker.
    read_threads: threads per process, each assembling one batch (decoding
      releases the GIL); 2 * read_threads batches are buffered.

  Returns:
    A grain.IterDataset of batches (dicts of arrays with a leading [B] axis;
    strings as object arrays) whose iterators support get_state/set_state.
  """
  if batch_size <= 0:
    raise ValueError(f"batch_size={batch_size}; expected > 0 "
                     "(config.data.batch_size).")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(
        f"process_index={process_index}, process_count={process_count}; "
        "expected 0 <= process_index < process_count.")
  if num_epochs is not None and num_epochs <= 0:
    raise ValueError(f"num_epochs={num_epochs}; expected None (forever) or "
                     "> 0 (config.data.num_epochs).")
  if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
    raise ValueError(f"seed={seed!r}; expected a non-negative int "
                     "(config.seed).")
  if worker_count < 0:
    raise ValueError(f"worker_count={worker_count}; expected >= 0 "
                     "(config.data.worker_count).")
  shard_size = len(source) // process_count
  if shard_size == 0:
    raise ValueError(
        f"The source has {len(source)} records, fewer than process_count="
        f"{process_count}: every host needs at least one.")
  if (num_epochs is not None and drop_remainder
      and shard_size * num_epochs < batch_size):
    raise ValueError(
        f"{shard_size * num_epochs} examples per host ({num_epochs} epochs of "
        f"{shard_size}) do not fill one batch of {batch_size}: lower "
        "config.data.batch_size or raise num_epochs.")

  dataset = grain.MapDataset.source(source)
  if process_count > 1:
    used = dataset[:shard_size * process_count]  # equal shards
    dataset = used[process_index::process_count]
  if shuffle:
    dataset = dataset.shuffle(seed=_shuffle_seed(seed))
  dataset = dataset.repeat(num_epochs)
  if transform is not None:
    dataset = dataset.map(transform)
  dataset = dataset.batch(batch_size, drop_remainder=drop_remainder,
                          batch_fn=stack_examples)
  # Elements are whole batches here, so buffer a few (grain's default of
  # 500 suits single examples).
  iter_dataset = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=read_threads, prefetch_buffer_size=2 * read_threads))
  if worker_count > 0:
    iter_dataset = iter_dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=worker_buffer_size))
  return iter_dataset


# ----------------------------------------------------------------------------
# Image + caption data sets.
# ----------------------------------------------------------------------------


def _check_split(builder, split: str, source: str) -> None:
  # TFDS slicing ("train[:90%]") is allowed; check the split's name.
  if split.split("[")[0] not in builder.info.splits:
    raise ValueError(
        f"Split {split!r} is not in data source {source!r}; it has "
        f"{sorted(builder.info.splits)}.")


def converted_builder(source: str, setting: str = "config.data.source"):
  """The TFDS builder of a directory written by unimm.tools.convert.

  Raises:
    ValueError: `source` is not such a directory (the message names
      `setting`, the config field or argument that gave it, and the
      command that writes one).
  """
  if not epath.Path(source, "dataset_info.json").is_file():
    raise ValueError(
        f"{setting}={source!r} is neither one of {sorted(SHAPES_SOURCES)} "
        "nor a directory written by `python -m unimm.tools.convert --out "
        f"{source} --image_size S ...` (it has no dataset_info.json); "
        "convert your images and captions there first.")
  return tfds.builder_from_directory(source)


def converted_info(source: str, setting: str = "config.data.source"
                   ) -> dict[str, Any]:
  """What a converted directory holds, read from its metadata only.

  Returns:
    {"image_size": S (the stored images are S x S),
     "splits": {split name: number of examples},
     "features": sorted feature names ("image", "caption"[, "captions"])}.

  Raises:
    ValueError: `source` is not a converted directory (converted_builder).
  """
  builder = converted_builder(source, setting)
  features = builder.info.features
  return {"image_size": int(features["image"].shape[0]),
          "splits": {name: int(info.num_examples)
                     for name, info in builder.info.splits.items()},
          "features": sorted(features.keys())}


def read_captions(source: str, split: str, *, all_captions: bool = True,
                  setting: str = "config.data.source") -> list[str]:
  """The captions of `split` (TFDS slicing allowed, e.g. "train[:-200]") of
  a converted directory, in record order, without decoding any image.

  all_captions: every caption of each record (its "captions" feature, in
  input order) when the data set has that feature; otherwise (or when
  False) the first caption of each record only.
  """
  builder = converted_builder(source, setting)
  _check_split(builder, split, source)
  data_source = builder.as_data_source(
      split=split, decoders={"image": tfds.decode.SkipDecoding()})
  use_all = all_captions and "captions" in builder.info.features
  captions = []
  for low in range(0, len(data_source), 1024):
    records = data_source.__getitems__(
        list(range(low, min(len(data_source), low + 1024))))
    for record in records:
      if use_all:
        captions.extend(c for c in _as_str(record["captions"]).split(
            convert.CAPTION_SEPARATOR) if c.strip())
      else:
        captions.append(_as_str(record["caption"]))
  return captions


def image_text_source(source: str, split: str, *, image_size: int,
                      data_dir: str | None = None):
  """(random-access TFDS data source, stored image size) for `source`."""
  if source in SHAPES_SOURCES:
    variant = SHAPES_SOURCES[source]
    name = f"{tfds_shapes.NAME}/{tfds_shapes.config_name(image_size, variant)}"
    data_dir = tfds_shapes.build_shapes(image_size, data_dir, variant=variant)
    builder = tfds.builder(name, data_dir=data_dir)
    _check_split(builder, split, source)
    data_source = tfds.data_source(name, split=split, data_dir=data_dir,
                                   download=False)
  else:
    builder = converted_builder(source)
    _check_split(builder, split, source)
    data_source = builder.as_data_source(split=split)
  stored_size = builder.info.features["image"].shape[0]
  return data_source, stored_size


def _as_str(value) -> str:
  if isinstance(value, np.ndarray):
    value = value.item()
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def parse_image_text(example: Mapping[str, Any], *,
                     image_size: int) -> dict[str, Any]:
  """TFDS example -> {"image": uint8 [S, S, 3], "caption": str[, "captions",
  "scene"]}: "captions" (a converted set's every caption, joined by
  convert.CAPTION_SEPARATOR) when the data set stores them."""
  image = np.asarray(example["image"], dtype=np.uint8)  # [H, W, 3]
  if image.shape != (image_size, image_size, 3):
    image = np.asarray(convert.resize_and_center_crop(
        convert.to_rgb(Image.fromarray(image.squeeze())), image_size))
  parsed = {"image": image, "caption": _as_str(example["caption"])}
  if "captions" in example:
    parsed["captions"] = _as_str(example["captions"])
  if "scene" in example:
    parsed["scene"] = _as_str(example["scene"])
  return parsed


def _then(first, second, example):  # picklable for grain's workers
  return second(first(example))


def image_text_dataset(
    source: str,
    split: str,
    *,
    batch_size: int,
    image_size: int,
    shuffle: bool,
    seed: int,
    num_epochs: int | None = None,
    process_index: int = 0,
    process_count: int = 1,
    data_dir: str | None = None,
    worker_count: int = 0,
    drop_remainder: bool = True,
    in_memory: bool = False,
    then: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
) -> grain.IterDataset:
  """Batches {"image": uint8 [B, S, S, 3], "caption": object [B]} per host.

  Shapes sources add "scene" (object [B] of JSON strings, the ground truth).
  Converted directories stored at another size than `image_size` are resized
  (shorter side) and centre-cropped on the fly, with a warning: re-run the
  converter with --image_size to avoid that cost. Shapes sources exist at
  sizes 32, 64, 128, 256 only (a ValueError names config.data.image_size).
  in_memory reads and parses the whole split once (InMemorySource), for
  small data sets read many times. then: a function of each parsed
  example, applied before batching (e.g. interleaved.edit_pair). See
  `batched_dataset` for the others.
  """
  if image_size <= 0:
    raise ValueError(f"config.data.image_size={image_size}; expected > 0.")
  data_source, stored_size = image_text_source(
      source, split, image_size=image_size, data_dir=data_dir)
  if stored_size != image_size:
    logging.warning(
        "%s stores %dx%d images; resizing to config.data.image_size=%d on "
        "the fly. Convert at --image_size %d to skip this.", source,
        stored_size, stored_size, image_size, image_size)
  transform = functools.partial(parse_image_text, image_size=image_size)
  if in_memory:
    data_source = InMemorySource(data_source, transform,
                                 name=f"{source}:{split}")
    transform = None
  if then is not None:
    transform = (then if transform is None else
                 functools.partial(_then, transform, then))
  return batched_dataset(
      data_source, batch_size=batch_size, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, process_index=process_index,
      process_count=process_count, transform=transform,
      drop_remainder=drop_remainder, worker_count=worker_count)
