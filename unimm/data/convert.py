r"""Own images + captions -> an ArrayRecord data set that the pipelines read.

  python -m unimm.tools.convert --out DIR --image_size 256 \
      --images_dir IMAGES --captions captions.jsonl [--split train]
  python -m unimm.tools.convert --out DIR --image_size 256 \
      --tar_shards 'shards/*.tar' [--num_shards 64] [--split validation]

(unimm/tools/convert.py; it calls `convert(out=DIR, image_size=256, ...)`).

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
import tarfile
import time
from typing import Any, Iterable, Iterator

from array_record.python import array_record_module
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from unimm.evaluation.reports import write_json
from unimm.progress import Progress

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


class _BytesRead:
  """Bytes of the tar shards read so far (for the fraction done)."""

  def __init__(self):
    self.base = self.done = 0


def _tar_samples(paths: list[str], stats: Stats,
                 read: _BytesRead) -> Iterator[tuple]:
  """(name, image bytes, caption) per complete KEY.{image,txt} pair."""
  for path in paths:
    pending = {}  # key -> {"image": (name, bytes), "caption": str}
    try:
      with open(path, "rb") as file, tarfile.open(fileobj=file,
                                                  mode="r|*") as tar:
        for member in tar:
          read.done = read.base + file.tell()
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
    read.base += os.path.getsize(path)
    read.done = read.base


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
  features = tfds.features.FeatureConnector.from_config(out)
  return features["image"].shape[0]


def _write_metadata(out: str, image_size: int, image_format: str) -> None:
  """dataset_info.json + features.json for every split present in `out`."""
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
      description="Images and captions converted by unimm.tools.convert.")


def convert(*, out: str, image_size: int, split: str = "train",
            images_dir: str | None = None, captions: str | None = None,
            tar_shards: str | None = None, num_shards: int = 1,
            num_workers: int = 0, image_format: str = "jpeg",
            progress_every: int = 1000) -> dict[str, Any]:
  """Converts one split into `out`; returns (and writes) the summary.

  Progress (rate, ETA) is logged every 10 s and every `progress_every`
  images.
  """
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

  features = _features(image_size, image_format)
  stats = Stats()
  start = time.time()
  referenced: set[str] = set()
  read, total_bytes = _BytesRead(), 0
  if captions is not None:
    with open(captions, encoding="utf-8") as f:
      total = sum(1 for line in f if line.strip())
    samples = _jsonl_samples(captions, images_dir, stats, referenced)
  else:
    paths = sorted(glob.glob(tar_shards))
    if not paths:
      raise ValueError(f"--tar_shards={tar_shards!r} matches no file.")
    total, total_bytes = None, sum(os.path.getsize(p) for p in paths)
    samples = _tar_samples(paths, stats, read)
  # Tar shards: the number of images is unknown; the bytes read give the
  # fraction done.
  progress = Progress(total, what="Processed images",
                      every_items=progress_every)

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
      progress.update(stats.converted + stats.skipped,
                      fraction=read.done / total_bytes if total_bytes
                      else None)
  finally:
    if pool is not None:
      pool.shutdown()
    for writer in writers:
      writer.close()
  if images_dir is not None and captions is not None:
    _unreferenced_images(images_dir, referenced, stats)
  progress.finish(stats.converted + stats.skipped)

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
  return write_json(os.path.join(out, "convert_summary.json"), summary)
