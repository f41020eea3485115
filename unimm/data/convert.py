r"""Own images + captions -> an ArrayRecord data set that the pipelines read.

  python -m unimm.data.convert --out DIR --image_size 256 \
      --images_dir IMAGES --captions captions.jsonl [--split train]
  python -m unimm.data.convert --out DIR --image_size 256 \
      --tar_shards 'shards/*.tar' [--num_shards 64] [--split validation]

Then train with config.data.source=DIR (and config.data.image_size=256).

Inputs:
  --captions: JSON lines {"image": path, "caption": text}; a relative path is
    relative to --images_dir. Images under --images_dir that no line
    mentions are counted as "image without caption".
  --tar_shards: webdataset / img2dataset shards; members KEY.{jpg,jpeg,png,
    webp} + KEY.txt (KEY = member path up to the first dot of its base name).
    Shards are streamed and read in memory, never extracted; members with
    absolute or ".." names are ignored.

Every image is decoded (EXIF orientation applied), converted to RGB
(grayscale, palette, CMYK; transparency is composited on white), its
shorter side resized to --image_size with a Lanczos filter and centre-
cropped square. Pillow's decompression-bomb guard stays on. Unreadable,
corrupt, missing or oversized images, and captions without images (or the
reverse) are skipped and counted; DIR/convert_summary.json records the
counts and the first skipped paths with reasons.

DIR is a TFDS-format directory (dataset_info.json + ArrayRecord shards
"unimm_image_text-SPLIT.array_record-0000i-of-0000N"); converting another
split into the same DIR adds it (the image size must match).
"""
import collections
import concurrent.futures
import glob
import io
import json
import multiprocessing
import os
import posixpath
import re
import shutil
import sys
import tarfile
import time
from typing import Any, Iterable, Iterator

from absl import app
from absl import flags
from absl import logging
from PIL import Image
from PIL import ImageOps

DATASET_NAME = "unimm_image_text"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
MAX_REPORTED_SKIPS = 50
# A tar member larger than this is skipped unread (memory guard).
MAX_MEMBER_BYTES = 256 << 20
_JPEG_QUALITY = 95


# ----------------------------------------------------------------------------
# Image processing (also used by the pipeline to resize on the fly).
# ----------------------------------------------------------------------------


def to_rgb(image: Image.Image) -> Image.Image:
  """RGB view of any Pillow image; transparency is composited on white."""
  if image.mode == "P":
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA") or (
      image.mode == "RGBa"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")
  if image.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
    # 16/32-bit grayscale: scale to 8 bits instead of clipping.
    array = _to_uint8(image)
    return Image.fromarray(array).convert("RGB")
  return image if image.mode == "RGB" else image.convert("RGB")


def _to_uint8(image: Image.Image):
  import numpy as np  # pylint: disable=g-import-not-at-top
  array = np.asarray(image, dtype=np.float64)
  high = array.max() if array.size else 0.0
  scale = 255.0 / (65535.0 if high > 255 else 255.0)
  return np.clip(array * scale, 0, 255).astype(np.uint8)


def resize_and_center_crop(image: Image.Image, size: int) -> Image.Image:
  """Shorter side -> `size` (Lanczos), then the centred size x size square."""
  width, height = image.size
  side = min(width, height)
  left, top = (width - side) // 2, (height - side) // 2
  # Cropping the centred square first, then one resample, equals resizing
  # the shorter side then cropping, with a single filter pass.
  return image.resize((size, size), Image.Resampling.LANCZOS,
                      box=(left, top, left + side, top + side))


def process_image(data: bytes, image_size: int, image_format: str) -> bytes:
  """Encoded image bytes -> encoded RGB [image_size, image_size] image.

  Raises on unreadable/corrupt data and on decompression bombs (Pillow's
  Image.MAX_IMAGE_PIXELS guard is left on).
  """
  with Image.open(io.BytesIO(data)) as image:
    # JPEG: decode at the smallest DCT scale still >= image_size (faster).
    image.draft("RGB", (image_size, image_size))
    image = ImageOps.exif_transpose(image)
    image = resize_and_center_crop(to_rgb(image), image_size)
  buffer = io.BytesIO()
  if image_format == "jpeg":
    image.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
  else:
    image.save(buffer, format="PNG")
  return buffer.getvalue()


# ----------------------------------------------------------------------------
# Inputs: (name, image bytes or path, caption) samples.
# ----------------------------------------------------------------------------


class Stats:
  """Counts of converted / skipped samples and the first skipped paths."""

  def __init__(self):
    self.converted = 0
    self.skipped = 0
    self.reasons = collections.Counter()
    self.first_skipped = []

  def skip(self, path: str, reason: str, detail: str = "") -> None:
    self.skipped += 1
    self.reasons[reason] += 1
    if len(self.first_skipped) < MAX_REPORTED_SKIPS:
      entry = {"path": path, "reason": reason}
      if detail:
        entry["detail"] = detail[:300]
      self.first_skipped.append(entry)


def _extension(name: str) -> str:
  return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _jsonl_samples(captions_path: str, images_dir: str | None,
                   stats: Stats, referenced: set[str]) -> Iterator[tuple]:
  """(name, path, caption) per valid line of the captions file."""
  with open(captions_path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{captions_path}:{line_number}"
      try:
        record = json.loads(line)
        image, caption = record["image"], record["caption"]
        if not isinstance(image, str) or not isinstance(caption, str):
          raise TypeError("image and caption must be strings")
      except (ValueError, KeyError, TypeError) as e:
        stats.skip(where, "bad captions line", repr(e))
        continue
      path = image if os.path.isabs(image) or images_dir is None else (
          os.path.join(images_dir, image))
      path = os.path.normpath(path)
      referenced.add(path)
      yield path, path, caption


def _unreferenced_images(images_dir: str, referenced: set[str],
                         stats: Stats) -> None:
  for root, _, files in os.walk(images_dir):
    for file in sorted(files):
      path = os.path.normpath(os.path.join(root, file))
      if _extension(file) in IMAGE_EXTENSIONS and path not in referenced:
        stats.skip(path, "image without caption")


def _is_unsafe_member(name: str) -> bool:
  parts = name.replace("\\", "/").split("/")
  return name.startswith(("/", "\\")) or ".." in parts or (
      len(name) > 1 and name[1] == ":")


def _tar_samples(paths: list[str], stats: Stats,
                 progress: "_Progress") -> Iterator[tuple]:
  """(name, image bytes, caption) per complete KEY.{image,txt} pair."""
  for path in paths:
    pending = {}  # key -> {"image": (name, bytes), "caption": str}
    try:
      with open(path, "rb") as file, tarfile.open(fileobj=file,
                                                  mode="r|*") as tar:
        for member in tar:
          progress.bytes_done = progress.bytes_base + file.tell()
          name = member.name
          if _is_unsafe_member(name):
            stats.skip(f"{path}:{name}", "unsafe member name")
            continue
          if not member.isfile():
            continue
          directory, base = posixpath.split(name)
          key, _, extension = base.partition(".")
          extension = extension.lower()
          if extension not in IMAGE_EXTENSIONS + CAPTION_EXTENSIONS:
            continue  # e.g. KEY.json metadata.
          key = posixpath.join(directory, key)
          if member.size > MAX_MEMBER_BYTES:
            stats.skip(f"{path}:{name}", "member too large",
                       f"{member.size} bytes")
            continue
          data = tar.extractfile(member).read()  # In memory only.
          sample = pending.setdefault(key, {})
          if extension in CAPTION_EXTENSIONS:
            sample["caption"] = data.decode("utf-8", errors="replace").strip()
          else:
            sample["image"] = (name, data)
          if "image" in sample and "caption" in sample:
            del pending[key]
            yield f"{path}:{sample['image'][0]}", sample["image"][1], (
                sample["caption"])
    except (tarfile.TarError, OSError, EOFError) as e:
      stats.skip(path, "unreadable tar", repr(e))
    for key, sample in pending.items():
      if "image" in sample:
        stats.skip(f"{path}:{sample['image'][0]}", "image without caption")
      else:
        stats.skip(f"{path}:{key}.txt", "caption without image")
    progress.bytes_base += os.path.getsize(path)
    progress.bytes_done = progress.bytes_base


def _convert_sample(sample: tuple, image_size: int, image_format: str):
  """(name, image path or bytes, caption) -> (encoded | None, reason)."""
  _, image, caption = sample
  if not caption.strip():
    return None, ("empty caption", "")
  if isinstance(image, str):
    try:
      with open(image, "rb") as f:
        image = f.read()
    except FileNotFoundError:
      return None, ("caption without image", "file not found")
    except OSError as e:
      return None, ("unreadable image", repr(e))
  try:
    return process_image(image, image_size, image_format), None
  except Image.DecompressionBombError as e:
    return None, ("decompression bomb", repr(e))
  except Exception as e:  # pylint: disable=broad-except
    # Untrusted bytes: Pillow raises many types (OSError, SyntaxError,
    # ValueError, struct.error, ...) on corrupt files.
    return None, ("corrupt image", repr(e))


def _convert_batch(samples: list[tuple], image_size: int,
                   image_format: str) -> list[tuple]:
  return [_convert_sample(s, image_size, image_format) for s in samples]


class _Progress:
  """Logs rate and ETA every `every` samples and at most every 30 s."""

  def __init__(self, every: int, total_samples: int | None = None,
               total_bytes: int | None = None):
    self.every, self.total_samples, self.total_bytes = (
        every, total_samples, total_bytes)
    self.bytes_base = self.bytes_done = 0
    self.start = self.last_log = time.time()
    self.last_count = 0

  def update(self, count: int, force: bool = False) -> None:
    now = time.time()
    if not force and count - self.last_count < self.every and (
        now - self.last_log < 30 or count == self.last_count):
      return
    self.last_log, self.last_count = now, count
    elapsed = max(now - self.start, 1e-6)
    fraction = None
    if self.total_samples:
      fraction = count / self.total_samples
    elif self.total_bytes:
      fraction = self.bytes_done / self.total_bytes
    eta = "?"
    if fraction:
      eta = _format_seconds(elapsed * (1 - fraction) / fraction)
    percent = f" ({100 * fraction:.1f}%)" if fraction is not None else ""
    logging.info("Processed %d images%s, %.1f images/s, elapsed %s, ETA %s.",
                 count, percent, count / elapsed, _format_seconds(elapsed),
                 eta)


def _format_seconds(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _batches(iterable: Iterable, size: int) -> Iterator[list]:
  batch = []
  for item in iterable:
    batch.append(item)
    if len(batch) == size:
      yield batch
      batch = []
  if batch:
    yield batch


# ----------------------------------------------------------------------------
# Output: TFDS-format ArrayRecord shards + metadata.
# ----------------------------------------------------------------------------


def _features(image_size: int, image_format: str):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.features.FeaturesDict({
      "image": tfds.features.Image(shape=(image_size, image_size, 3),
                                   encoding_format=image_format),
      "caption": tfds.features.Text(),
  })


def _shard_name(split: str, index: int, count: int) -> str:
  return (f"{DATASET_NAME}-{split}.array_record-{index:05d}-of-{count:05d}")


def _split_files(out: str, split: str) -> list[str]:
  pattern = re.compile(
      rf"^{DATASET_NAME}-{re.escape(split)}\.array_record-\d{{5}}-of-\d{{5}}$")
  return sorted(f for f in os.listdir(out) if pattern.match(f))


def _existing_image_size(out: str) -> int | None:
  if not os.path.isfile(os.path.join(out, "features.json")):
    return None
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  features = tfds.features.FeatureConnector.from_config(out)
  return features["image"].shape[0]


def _write_metadata(out: str, image_size: int, image_format: str) -> None:
  """dataset_info.json + features.json for every split present in `out`."""
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  split_names = sorted({
      f.split("-")[1].split(".")[0] for f in os.listdir(out)
      if f.startswith(DATASET_NAME + "-") and ".array_record-" in f})
  split_infos = []
  for split in split_names:
    lengths, num_bytes = [], 0
    for file in _split_files(out, split):
      path = os.path.join(out, file)
      reader = array_record_module.ArrayRecordReader(path)
      lengths.append(reader.num_records())
      reader.close()
      num_bytes += os.path.getsize(path)
    split_infos.append(tfds.core.SplitInfo(
        name=split, shard_lengths=lengths, num_bytes=num_bytes))
  tfds.folder_dataset.write_metadata(
      data_dir=out, features=_features(image_size, image_format),
      split_infos=split_infos, check_data=False,
      description="Images and captions converted by unimm.data.convert.")


def convert(*, out: str, image_size: int, split: str = "train",
            images_dir: str | None = None, captions: str | None = None,
            tar_shards: str | None = None, num_shards: int = 1,
            num_workers: int = 0, image_format: str = "jpeg",
            progress_every: int = 1000) -> dict[str, Any]:
  """Converts one split into `out`; returns (and writes) the summary."""
  if (captions is None) == (tar_shards is None):
    raise ValueError("Give exactly one input: --captions (with --images_dir) "
                     "or --tar_shards.")
  if image_size <= 0:
    raise ValueError(f"--image_size={image_size}; expected > 0.")
  if num_shards <= 0:
    raise ValueError(f"--num_shards={num_shards}; expected > 0.")
  if not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(f"--split={split!r}; expected letters, digits, _.")
  if image_format not in ("jpeg", "png"):
    raise ValueError(f"--image_format={image_format!r}; expected jpeg|png.")
  os.makedirs(out, exist_ok=True)
  existing = _existing_image_size(out)
  if existing is not None and existing != image_size:
    raise ValueError(
        f"{out} already holds {existing}x{existing} images; convert with "
        f"--image_size {existing} or into another --out directory.")

  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  features = _features(image_size, image_format)
  stats = Stats()
  start = time.time()
  referenced: set[str] = set()
  if captions is not None:
    with open(captions, encoding="utf-8") as f:
      total = sum(1 for line in f if line.strip())
    progress = _Progress(progress_every, total_samples=total)
    samples = _jsonl_samples(captions, images_dir, stats, referenced)
  else:
    paths = sorted(glob.glob(tar_shards))
    if not paths:
      raise ValueError(f"--tar_shards={tar_shards!r} matches no file.")
    progress = _Progress(progress_every,
                         total_bytes=sum(os.path.getsize(p) for p in paths))
    samples = _tar_samples(paths, stats, progress)

  tmp_dir = os.path.join(out, f".tmp-{split}")
  shutil.rmtree(tmp_dir, ignore_errors=True)
  os.makedirs(tmp_dir)
  writers = [array_record_module.ArrayRecordWriter(
      os.path.join(tmp_dir, _shard_name(split, i, num_shards)),
      "group_size:1") for i in range(num_shards)]
  pool = None
  if num_workers > 0:
    # spawn: the parent may already run TF threads; fork could deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    # Bounded windows keep memory flat for large tar shards.
    window = max(1, num_workers) * 64
    for batch in _batches(samples, window):
      if pool is None:
        results = _convert_batch(batch, image_size, image_format)
      else:
        parts = [batch[i:i + 16] for i in range(0, len(batch), 16)]
        results = [r for part in pool.map(
            _convert_batch, parts, [image_size] * len(parts),
            [image_format] * len(parts)) for r in part]
      for (name, _, caption), (encoded, reason) in zip(batch, results):
        if encoded is None:
          stats.skip(name, *reason)
        else:
          # Round robin keeps shards equal in size.
          writers[stats.converted % num_shards].write(
              features.serialize_example({"image": encoded,
                                          "caption": caption}))
          stats.converted += 1
      progress.update(stats.converted + stats.skipped)
  finally:
    if pool is not None:
      pool.shutdown()
    for writer in writers:
      writer.close()
  if images_dir is not None and captions is not None:
    _unreferenced_images(images_dir, referenced, stats)
  progress.update(stats.converted + stats.skipped, force=True)

  if stats.converted:
    for old in _split_files(out, split):
      os.remove(os.path.join(out, old))
    for file in os.listdir(tmp_dir):
      os.replace(os.path.join(tmp_dir, file), os.path.join(out, file))
    _write_metadata(out, image_size, image_format)
  shutil.rmtree(tmp_dir, ignore_errors=True)

  summary = {
      "out": os.path.abspath(out),
      "split": split,
      "image_size": image_size,
      "num_shards": num_shards if stats.converted else 0,
      "converted": stats.converted,
      "skipped": stats.skipped,
      "skipped_by_reason": dict(sorted(stats.reasons.items())),
      "captions_without_images": stats.reasons["caption without image"],
      "images_without_captions": stats.reasons["image without caption"],
      "first_skipped": stats.first_skipped,
      "seconds": round(time.time() - start, 2),
  }
  with open(os.path.join(out, "convert_summary.json"), "w") as f:
    json.dump(summary, f, indent=2)
  return summary




# ----------------------------------------------------------------------------
# Command line.
# ----------------------------------------------------------------------------


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  flags.DEFINE_string("out", None, "Output directory.", flag_values=flag_values)
  flags.DEFINE_integer("image_size", None, "Output images are square, this "
                       "many pixels a side.", flag_values=flag_values)
  flags.DEFINE_string("images_dir", None, "Root of relative image paths in "
                      "--captions.", flag_values=flag_values)
  flags.DEFINE_string("captions", None, 'JSON lines {"image": path, '
                      '"caption": text}.', flag_values=flag_values)
  flags.DEFINE_string("tar_shards", None, "Glob of webdataset tar shards.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_shards", 16, "Output ArrayRecord shards.",
                       flag_values=flag_values)
  flags.DEFINE_string("split", "train", "Split name to write.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Image decoding "
                       "processes (0 = in this process).",
                       flag_values=flag_values)
  flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Stored "
                    "encoding (jpeg: quality 95).", flag_values=flag_values)
  flags.DEFINE_integer("progress_every", 1000, "Log progress every N images.",
                       flag_values=flag_values)
  flags.mark_flags_as_required(["out", "image_size"], flag_values=flag_values)


def run(flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the conversion from parsed flags; prints the summary."""
  summary = convert(
      out=flag_values.out, image_size=flag_values.image_size,
      split=flag_values.split, images_dir=flag_values.images_dir,
      captions=flag_values.captions, tar_shards=flag_values.tar_shards,
      num_shards=flag_values.num_shards, num_workers=flag_values.num_workers,
      image_format=flag_values.image_format,
      progress_every=flag_values.progress_every)
  print(json.dumps(summary, indent=2))
  if not summary["converted"]:
    print("No image was converted; see first_skipped above.", file=sys.stderr)
    return 1
  return 0


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  try:
    return run()
  except ValueError as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
