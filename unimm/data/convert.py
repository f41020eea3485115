r"""Own images + captions -> an ArrayRecord data set that the pipelines read.

  python -m unimm.tools.convert --out DIR --image_size 256 INPUT \
      [--split train] [--num_shards 16] [--max_pixels N]

with exactly one INPUT (unimm/tools/convert.py calls
`convert(out=DIR, image_size=256, ...)` with the same names):

  --captions captions.jsonl --images_dir IMAGES   JSON lines
  --tar_shards 'shards/*.tar'                       webdataset / img2dataset
  --csv captions.csv (or .tsv) [--images_dir IMAGES]
  --imagefolder HF_DIR                              Hugging Face imagefolder
  --parquet 'shards/*.parquet'                      HF datasets, LAION
  --coco captions_train2017.json --images_dir train2017

Then train with config.data.source=DIR (and config.data.image_size=256).

Inputs (images are local files or bytes; a path that is an http(s):// URL
is skipped and counted as "remote image (download first, e.g. with
img2dataset)"):
  --captions: JSON lines {"image": path, "caption": text} ("caption" may
    also be a list of texts; --image_column / --caption_column name other
    keys); a relative path is relative to --images_dir.
  --csv: a CSV, or a TSV (by the extension .tsv, or --delimiter), whose
    first row names the columns: --image_column (default "image", local
    paths relative to --images_dir, default the file's folder) and
    --caption_column (default "caption"); CC3M-style files.
  --imagefolder: a Hugging Face `imagefolder` directory: every
    metadata.jsonl or metadata.csv in DIR and its subfolders (such as
    train/, test/; give DIR/train to convert one of them) lists "file_name"
    (relative to that metadata file's folder) and a caption column
    (--caption_column, else "text", else "caption").
  --parquet: a glob of parquet shards, streamed in batches of rows (never a
    whole file in memory; needs pyarrow). The image column (--image_column,
    else "image", else "jpg") holds encoded bytes, a {"bytes", "path"}
    struct as Hugging Face datasets writes (the path, relative to
    --images_dir or the shard's folder, is read when the bytes are null),
    or a path; the caption column is --caption_column, else "caption", else
    "text".
  --coco: a COCO captions JSON ("images": [{"id", "file_name"}],
    "annotations": [{"image_id", "caption"}]); the files are in
    --images_dir (required).
  --tar_shards: webdataset / img2dataset shards; members KEY.{jpg,jpeg,png,
    webp} + KEY.txt (KEY = member path up to the first dot of its base name).
    Shards are streamed and read in memory, never extracted; members with
    absolute or ".." names are ignored.
  Images under --images_dir (--captions, --csv, --coco) or under
  --imagefolder that no row mentions are counted as "image without caption".
  A row that is not UTF-8, not JSON, lacks a column or has a non-text
  caption is skipped and counted as "bad captions line" (FILE:LINE; parquet
  and COCO: FILE[ROW], FILE:annotations[I]); the rest converts.

Several captions per image (COCO has about 5; rows of a JSONL, CSV or
imagefolder metadata may name one image several times, anywhere in the
file) are all kept: a newline (or other line break) inside a caption
becomes a space, exact repeats are dropped, and each record holds
  "image":    the encoded image, [S, S, 3];
  "caption":  the first caption (what unimm.data.pipeline reads);
  "captions": all of them in input order joined with "\n"
              (captions.split("\n") gives them back), for drawing one per
              example and epoch.
Row formats are read twice: once to index the images (one path per image in
memory), once to convert, each image at its last row. Progress (count,
rate, fraction done by rows read, or bytes for tar shards, and ETA) is
logged every 10 s.

Every image is opened with Pillow (JPEG, PNG, WebP, GIF, BMP, TIFF, AVIF
only: no format that runs an external program, such as EPS), and its
size read from the header is checked against --max_pixels (default
Pillow's Image.MAX_IMAGE_PIXELS, about 89.5 MP) before anything is decoded:
larger images are skipped as "image too large" with their size. Pillow
refuses images above twice its limit when opening them, so --max_pixels may
be at most 2 x Image.MAX_IMAGE_PIXELS. Local files over 256 MiB are not
read. Then the image is decoded (EXIF orientation applied), converted to
RGB (grayscale, palette, CMYK; transparency is composited on white), its
shorter side resized to --image_size with a Lanczos filter and centre-
cropped square. Unreadable, corrupt, missing or oversized images, and
captions without images (or the reverse) are skipped and counted;
DIR/convert_summary.json records the counts and the first skipped paths
with reasons.

DIR is a TFDS-format directory (dataset_info.json + ArrayRecord shards
"unimm_image_text-SPLIT.array_record-0000i-of-0000N"); converting another
split into the same DIR adds it (the image size and the features must
match). Nothing is written outside DIR. The inputs are opened and checked
before DIR is created; a split is written into DIR/.tmp-SPLIT and moved
into place once complete, so a conversion interrupted before that (even
by kill -9) leaves the split as it was, and rerunning the same command
after an interruption at any point deletes the leftover .tmp-SPLIT and
converts again, without duplicates. A call that fails removes its
.tmp-SPLIT, and DIR too if the call created it and it is empty. A call that
converts nothing still writes DIR/convert_summary.json.
"""
import collections
import concurrent.futures
import csv as csv_lib
import dataclasses
import glob
import io
import json
import multiprocessing
import os
import posixpath
import re
import shutil
import stat
import tarfile
import time
from typing import Any, Callable, Collection, Iterable, Iterator
import warnings

from array_record.python import array_record_module
import numpy as np
from PIL import Image
from PIL import ImageOps
import tensorflow_datasets as tfds

from unimm import paths as paths_lib
from unimm.evaluation.reports import write_json
from unimm.progress import Progress

DATASET_NAME = "unimm_image_text"
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
CAPTION_EXTENSIONS = ("txt",)
# The formats Pillow may open (none runs an external program, as EPS does);
# JPEG includes MPO. Those this Pillow build lacks are left out.
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "AVIF")
MAX_REPORTED_SKIPS = 50
# A tar member or local file larger than this is skipped unread (memory).
MAX_MEMBER_BYTES = 256 << 20
# Rows per parquet read (parquet shards are streamed, never read whole).
PARQUET_BATCH_ROWS = 256
# The input kinds, as convert() arguments and flags (--captions, ...).
INPUTS = ("captions", "tar_shards", "csv", "imagefolder", "parquet", "coco")
# Which inputs each option applies to.
_OPTIONS = {
    "images_dir": ("captions", "csv", "coco", "parquet"),
    "image_column": ("captions", "csv", "imagefolder", "parquet"),
    "caption_column": ("captions", "csv", "imagefolder", "parquet"),
    "delimiter": ("csv",),
}
BAD_LINE = "bad captions line"
REMOTE_IMAGE = "remote image (download first, e.g. with img2dataset)"
TOO_LARGE = "image too large"
CAPTION_SEPARATOR = "\n"
_LINE_BREAKS = re.compile(r"[\r\n\v\f\x1c\x1d\x1e\x85\u2028\u2029]+")
_REMOTE = re.compile(r"https?://", re.IGNORECASE)
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


class ImageTooLargeError(ValueError):
  """The header's width x height exceeds max_pixels (nothing decoded)."""


def _formats() -> list[str]:
  Image.init()  # Registers the plugins once.
  return [f for f in IMAGE_FORMATS if f in Image.OPEN]


def default_max_pixels() -> int | None:
  """Pillow's Image.MAX_IMAGE_PIXELS (None: Pillow's guard is off)."""
  return Image.MAX_IMAGE_PIXELS


def process_image(data: bytes, image_size: int, image_format: str,
                  max_pixels: int | None = None) -> bytes:
  """Encoded image bytes -> encoded RGB [image_size, image_size] image.

  Args:
    data: the encoded image (one of IMAGE_FORMATS).
    image_size: the output side.
    image_format: "jpeg" or "png", the output encoding.
    max_pixels: the largest width x height to decode, checked from the
      header before decoding (None: default_max_pixels()).

  Raises:
    ImageTooLargeError: above max_pixels. Pillow's own guard stays on: it
      raises Image.DecompressionBombError when opening images above twice
      Image.MAX_IMAGE_PIXELS.
    Exception: other types on unreadable or corrupt data.
  """
  if max_pixels is None:
    max_pixels = default_max_pixels()
  with warnings.catch_warnings():
    # Pillow warns between its limit and twice it; max_pixels decides.
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)
    with Image.open(io.BytesIO(data), formats=_formats()) as image:
      width, height = image.size  # From the header: nothing decoded yet.
      if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLargeError(
            f"{width}x{height} = {width * height:,} pixels > --max_pixels "
            f"{max_pixels:,}")
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


def clean_caption(text: Any) -> str:
  """A caption with line breaks turned into spaces, stripped ("" for None).

  Raises:
    TypeError: `text` is neither str, bytes nor None.
    ValueError: it is not valid UTF-8 (bytes, or lone surrogates).
  """
  if text is None:  # A null cell: no caption.
    return ""
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  if not isinstance(text, str):
    raise TypeError(f"caption is {type(text).__name__}; expected text")
  text.encode("utf-8")  # Lone surrogates cannot be stored.
  return _LINE_BREAKS.sub(" ", text).strip()


# ----------------------------------------------------------------------------
# Inputs: (name, image path or bytes, captions) samples.
# ----------------------------------------------------------------------------

# (name for the summary, local path or encoded bytes, non-empty captions).
Sample = tuple[str, str | bytes, tuple[str, ...]]
# (FILE:LINE, image value, caption value(s), folder of relative paths).
_Row = tuple[str, Any, Any, str | None]


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


class _Skip(Exception):
  """A row or sample to skip: (reason, detail) for Stats.skip."""

  def __init__(self, reason: str, detail: str = ""):
    super().__init__(reason, detail)
    self.reason, self.detail = reason, detail


class _Position:
  """How much of the input is read (rows or bytes), for the fraction done."""

  def __init__(self, total: int = 0):
    self.total, self.done = total, 0

  @property
  def fraction(self) -> float | None:
    return min(self.done / self.total, 1.0) if self.total else None


@dataclasses.dataclass
class _Input:
  """The samples of one input, its position, and a folder to check for
  images that no row mentions (`referenced` are the ones mentioned)."""
  samples: Iterator[Sample]
  position: _Position
  walk: str | None = None
  referenced: Collection[str] = ()


def _extension(name: str) -> str:
  return name.rsplit(".", 1)[-1].lower() if "." in name else ""


def _unique(captions: Iterable[str]) -> tuple[str, ...]:
  """Non-empty captions in order, exact repeats dropped."""
  return tuple(dict.fromkeys(c for c in captions if c))


def _image_source(value: Any, base_dir: str | None) -> str | bytes:
  """A row's image value -> encoded bytes or a normalised local path."""
  if isinstance(value, dict):  # Hugging Face datasets' Image struct.
    value = value.get("bytes") or value.get("path")
  if isinstance(value, (bytes, bytearray, memoryview)) and len(value):
    return bytes(value)
  if not isinstance(value, str) or not value.strip():
    raise _Skip(BAD_LINE, f"image {str(value)[:80]!r}; expected a local "
                "path or encoded bytes")
  if _REMOTE.match(value):
    raise _Skip(REMOTE_IMAGE, value)
  if base_dir is not None and not os.path.isabs(value):
    value = os.path.join(base_dir, value)
  return os.path.normpath(value)


def _parse_row(row: _Row) -> tuple[str | bytes, list[str]]:
  """(image path or bytes, cleaned captions) of a row; raises _Skip."""
  _, image, captions, base_dir = row
  source = _image_source(image, base_dir)
  values = captions if isinstance(captions, (list, tuple)) else [captions]
  try:
    return source, [clean_caption(c) for c in values]
  except (TypeError, ValueError) as e:
    raise _Skip(BAD_LINE, repr(e)) from e


@dataclasses.dataclass(frozen=True)
class _Columns:
  """Which image / caption columns to read: the flag's value, else the
  first default present."""
  image: str | None
  image_defaults: tuple[str, ...]
  caption: str | None
  caption_defaults: tuple[str, ...]

  def resolve(self, present: Collection[str], where: str) -> tuple[str, str]:
    return (_pick_column(present, self.image, self.image_defaults,
                         "--image_column", where),
            _pick_column(present, self.caption, self.caption_defaults,
                         "--caption_column", where))


def _pick_column(present: Collection[str], given: str | None,
                 defaults: tuple[str, ...], flag: str, where: str) -> str:
  if given is not None:
    if given in present:
      return given
    raise ValueError(f"{flag}={given!r} is not a column of {where}; its "
                     f"columns are {list(present)}: set {flag} to one.")
  for name in defaults:
    if name in present:
      return name
  raise ValueError(
      f"{where} has none of the columns {list(defaults)} ({flag}'s "
      f"defaults); its columns are {list(present)}: set {flag} to one.")


def _jsonl_records(path: str, stats: Stats) -> Iterator[tuple[str, dict]]:
  """(FILE:LINE, object) per line; bad lines are skipped and counted."""
  with open(path, "rb") as f:
    for number, raw in enumerate(f, start=1):
      where = f"{path}:{number}"
      try:
        line = raw.decode("utf-8")
      except UnicodeDecodeError as e:
        stats.skip(where, BAD_LINE, f"not UTF-8: {e}")
        continue
      if number == 1:
        line = line.lstrip("\ufeff")
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except (ValueError, RecursionError) as e:
        stats.skip(where, BAD_LINE, repr(e))
        continue
      if not isinstance(record, dict):
        stats.skip(where, BAD_LINE,
                   f"a JSON {type(record).__name__}; expected an object")
        continue
      yield where, record


def _jsonl_rows(path: str, columns: _Columns, base_dir: str | None,
                stats: Stats) -> Iterator[_Row]:
  """Rows of a JSON lines file.

  The first object with the columns decides them (objects before it are bad
  lines); ValueError at the end if none has them.
  """
  names, error = None, None
  for where, record in _jsonl_records(path, stats):
    if names is None:
      try:
        names = columns.resolve(list(record), where)
      except ValueError as e:
        error = error or e
        stats.skip(where, BAD_LINE, str(e))
        continue
    if names[0] not in record or names[1] not in record:
      stats.skip(where, BAD_LINE, f"no key {names[0]!r} or {names[1]!r}")
      continue
    yield where, record[names[0]], record[names[1]], base_dir
  if names is None and error is not None:
    raise error


def _csv_rows(path: str, delimiter: str, columns: _Columns,
              base_dir: str | None, stats: Stats) -> Iterator[_Row]:
  """Rows of a CSV / TSV file whose first row names the columns."""
  # surrogateescape: a non-UTF-8 byte spoils its row only (checked below).
  with open(path, newline="", encoding="utf-8-sig",
            errors="surrogateescape") as f:
    reader = csv_lib.reader(f, delimiter=delimiter)
    try:
      header = next(reader, None)
    except csv_lib.Error as e:
      raise ValueError(f"{path}: unreadable header row ({e}).") from e
    if header is None:
      return
    image, caption = columns.resolve(header, f"{path} (header row)")
    image, caption = header.index(image), header.index(caption)
    needed = max(image, caption) + 1
    while True:
      try:
        row = next(reader)
      except StopIteration:
        return
      except csv_lib.Error as e:
        stats.skip(f"{path}:{reader.line_num}", BAD_LINE, repr(e))
        continue
      where = f"{path}:{reader.line_num}"
      if not row or row == [""]:
        continue
      if len(row) < needed:
        stats.skip(where, BAD_LINE,
                   f"{len(row)} fields; expected {len(header)}")
        continue
      try:
        (row[image] + row[caption]).encode("utf-8")
      except UnicodeEncodeError as e:
        stats.skip(where, BAD_LINE, f"not UTF-8: {e}")
        continue
      yield where, row[image], row[caption], base_dir


def _grouped_input(rows: Callable[[Stats], Iterator[_Row]], stats: Stats,
                   walk: str | None) -> _Input:
  """Samples of local images with all their rows' captions.

  Reads the rows once now (to index each image's last row; this also checks
  the columns, before anything is written) and again while converting.
  """
  last, total = {}, 0
  for index, row in enumerate(rows(Stats())):  # Its skips count below.
    total = index + 1
    try:
      source, _ = _parse_row(row)
    except _Skip:
      continue
    if isinstance(source, str):
      last[source] = index
  position = _Position(total)

  def samples() -> Iterator[Sample]:
    pending = {}  # path -> captions of its rows so far
    for index, row in enumerate(rows(stats)):
      position.done = index + 1
      try:
        source, captions = _parse_row(row)
      except _Skip as e:
        stats.skip(row[0], e.reason, e.detail)
        continue
      if isinstance(source, bytes):
        yield row[0], source, _unique(captions)
      elif last.get(source) != index:
        pending.setdefault(source, []).extend(captions)
      else:
        yield source, source, _unique(pending.pop(source, []) + captions)

  return _Input(samples(), position, walk, last.keys())


def _single_input(rows: Callable[[Stats], Iterator[_Row]], stats: Stats,
                  position: _Position) -> _Input:
  """One sample per row (parquet rows of image bytes)."""

  def samples() -> Iterator[Sample]:
    for row in rows(stats):
      try:
        source, captions = _parse_row(row)
      except _Skip as e:
        stats.skip(row[0], e.reason, e.detail)
        continue
      yield row[0] if isinstance(source, bytes) else source, source, (
          _unique(captions))

  return _Input(samples(), position)


def _imagefolder_metadata(root: str) -> list[str]:
  """The metadata.jsonl / metadata.csv files in `root` and its subfolders."""
  found = []
  for directory, subdirs, files in os.walk(root):
    subdirs.sort()
    names = [n for n in ("metadata.jsonl", "metadata.csv") if n in files]
    if len(names) == 2:
      raise ValueError(
          f"{directory} holds both metadata.jsonl and metadata.csv; keep one "
          "(an imagefolder has one metadata file per folder).")
    found += [os.path.join(directory, n) for n in names]
  if not found:
    raise ValueError(
        f"--imagefolder={root!r} holds no metadata.jsonl or metadata.csv "
        "(in it or its subfolders); expected a Hugging Face imagefolder with "
        "a file_name column and a caption column.")
  return found


def _parquet_input(pattern: str, images_dir: str | None, columns: _Columns,
                   stats: Stats) -> _Input:
  """Rows of parquet shards, streamed PARQUET_BATCH_ROWS at a time."""
  try:
    # pylint: disable=g-import-not-at-top
    import pyarrow
    import pyarrow.parquet as pq
  except ImportError as e:
    raise ImportError(
        f"--parquet={pattern!r} needs pyarrow, which is not installed: "
        "`python -m pip install pyarrow`, or convert from another input."
        ) from e
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"--parquet={pattern!r} matches no file.")
  errors = (pyarrow.ArrowException, OSError)
  shards, total = [], 0
  for path in paths:
    try:
      with pq.ParquetFile(path) as file:
        names, num_rows = file.schema_arrow.names, file.metadata.num_rows
    except errors as e:
      stats.skip(path, "unreadable parquet", repr(e))
      continue
    shards.append((path, columns.resolve(names, path)))
    total += num_rows
  position = _Position(total)

  def rows(row_stats: Stats) -> Iterator[_Row]:
    for path, (image, caption) in shards:
      base_dir = images_dir if images_dir is not None else (
          os.path.dirname(path))
      index = 0
      try:
        with pq.ParquetFile(path) as file:
          for batch in file.iter_batches(batch_size=PARQUET_BATCH_ROWS,
                                         columns=[image, caption]):
            images = batch.column(image).to_pylist()
            captions = batch.column(caption).to_pylist()
            for value, text in zip(images, captions):
              position.done += 1
              yield f"{path}[{index}]", value, text, base_dir
              index += 1
      except errors as e:
        row_stats.skip(f"{path}[{index}]", "unreadable parquet", repr(e))

  return _single_input(rows, stats, position)


def _coco_input(path: str, images_dir: str, stats: Stats) -> _Input:
  """Each COCO image with all its annotations' captions."""
  try:
    with open(path, "rb") as f:
      data = json.load(f)
  except (ValueError, RecursionError) as e:
    raise ValueError(f"--coco={path!r} is not a JSON file ({e}).") from e
  images = data.get("images") if isinstance(data, dict) else None
  annotations = data.get("annotations") if isinstance(data, dict) else None
  if not isinstance(images, list) or not isinstance(annotations, list):
    keys = list(data) if isinstance(data, dict) else type(data).__name__
    raise ValueError(
        f"--coco={path!r} has {keys}; expected a COCO captions JSON with "
        'lists "images" and "annotations" (captions_train2017.json).')
  by_id = collections.defaultdict(list)
  for i, annotation in enumerate(annotations):
    where = f"{path}:annotations[{i}]"
    try:
      image_id = annotation["image_id"]
      if not isinstance(image_id, (int, str)):
        raise TypeError(f"image_id {image_id!r}; expected int or str")
      by_id[image_id].append((where, clean_caption(annotation["caption"])))
    except (TypeError, KeyError, ValueError) as e:
      stats.skip(where, BAD_LINE, repr(e))
  entries, seen = [], set()
  for i, image in enumerate(images):
    where = f"{path}:images[{i}]"
    try:
      image_id, file_name = image["id"], image["file_name"]
      if not isinstance(image_id, (int, str)) or image_id in seen:
        raise ValueError(f"id {image_id!r}: not int/str or listed again")
      seen.add(image_id)
      entries.append((image_id, _image_source(file_name, images_dir)))
    except (TypeError, KeyError, ValueError) as e:
      stats.skip(where, BAD_LINE, repr(e))
    except _Skip as e:
      stats.skip(where, e.reason, e.detail)
  position = _Position(len(entries))

  def samples() -> Iterator[Sample]:
    for index, (image_id, source) in enumerate(entries):
      position.done = index + 1
      captions = by_id.pop(image_id, ())
      if not captions:
        stats.skip(source, "image without caption",
                   f"no annotation with image_id {image_id!r}")
        continue
      yield source, source, _unique(c for _, c in captions)
    for image_id, captions in by_id.items():
      for where, _ in captions:
        stats.skip(where, "caption without image",
                   f"image_id {image_id!r} is not in images")

  return _Input(samples(), position, images_dir,
                {source for _, source in entries})


def _unreferenced_images(images_dir: str, referenced: Collection[str],
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
                 read: _Position) -> Iterator[Sample]:
  """(name, image bytes, (caption,)) per complete KEY.{image,txt} pair."""
  offset = 0  # Bytes of the shards before this one.
  for path in paths:
    pending = {}  # key -> {"image": (name, bytes), "caption": str}
    try:
      with open(path, "rb") as file, tarfile.open(fileobj=file,
                                                  mode="r|*") as tar:
        for member in tar:
          read.done = offset + file.tell()
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
            sample["caption"] = clean_caption(
                data.decode("utf-8", errors="replace"))
          else:
            sample["image"] = (name, data)
          if "image" in sample and "caption" in sample:
            del pending[key]
            yield f"{path}:{sample['image'][0]}", sample["image"][1], (
                _unique([sample["caption"]]))
    except (tarfile.TarError, OSError, EOFError) as e:
      stats.skip(path, "unreadable tar", repr(e))
    for key, sample in pending.items():
      if "image" in sample:
        stats.skip(f"{path}:{sample['image'][0]}", "image without caption")
      else:
        stats.skip(f"{path}:{key}.txt", "caption without image")
    offset += os.path.getsize(path)
    read.done = offset


def _tar_input(pattern: str, stats: Stats) -> _Input:
  paths = sorted(glob.glob(pattern))
  if not paths:
    raise ValueError(f"--tar_shards={pattern!r} matches no file.")
  # The number of images is unknown; the bytes read give the fraction done.
  read = _Position(sum(os.path.getsize(p) for p in paths))
  return _Input(_tar_samples(paths, stats, read), read)


def _check_file(flag: str, path: str, folder: bool = False) -> None:
  if not (os.path.isdir(path) if folder else os.path.isfile(path)):
    raise ValueError(f"--{flag}={path!r}: no such "
                     f"{'folder' if folder else 'file'}.")


def _open_input(kind: str, value: str, *, images_dir: str | None,
                image_column: str | None, caption_column: str | None,
                delimiter: str | None, stats: Stats) -> _Input:
  """The input `kind` (one of INPUTS) at `value`, opened and checked."""
  if images_dir is not None:
    _check_file("images_dir", images_dir, folder=True)
  if kind == "captions":
    _check_file(kind, value)
    columns = _Columns(image_column, ("image",), caption_column, ("caption",))
    return _grouped_input(
        lambda s: _jsonl_rows(value, columns, images_dir, s), stats,
        walk=images_dir)
  if kind == "csv":
    _check_file(kind, value)
    if delimiter is None:
      delimiter = "\t" if value.lower().endswith(".tsv") else ","
    columns = _Columns(image_column, ("image",), caption_column, ("caption",))
    base_dir = images_dir if images_dir is not None else (
        os.path.dirname(value))
    return _grouped_input(
        lambda s: _csv_rows(value, delimiter, columns, base_dir, s), stats,
        walk=images_dir)
  if kind == "imagefolder":
    _check_file(kind, value, folder=True)
    files = _imagefolder_metadata(value)
    columns = _Columns(image_column, ("file_name",), caption_column,
                       ("text", "caption"))

    def rows(row_stats: Stats) -> Iterator[_Row]:
      for path in files:
        base_dir = os.path.dirname(path)
        if path.endswith(".csv"):
          yield from _csv_rows(path, ",", columns, base_dir, row_stats)
        else:
          yield from _jsonl_rows(path, columns, base_dir, row_stats)

    return _grouped_input(rows, stats, walk=value)
  if kind == "parquet":
    columns = _Columns(image_column, ("image", "jpg"), caption_column,
                       ("caption", "text"))
    return _parquet_input(value, images_dir, columns, stats)
  if kind == "coco":
    _check_file(kind, value)
    if images_dir is None:
      raise ValueError(f"--coco={value!r} needs --images_dir, the folder of "
                       "its images (e.g. train2017/).")
    return _coco_input(value, images_dir, stats)
  return _tar_input(value, stats)


def _check_arguments(inputs: dict[str, str | None],
                     options: dict[str, Any]) -> str:
  """The one input kind given; ValueError on a conflict."""
  given = [k for k in INPUTS if inputs[k] is not None]
  if len(given) != 1:
    raise ValueError(
        "Give exactly one input: "
        f"{', '.join('--' + k for k in INPUTS)}; given: "
        f"{', '.join('--' + k for k in given) or 'none'}.")
  kind = given[0]
  for option, kinds in _OPTIONS.items():
    if options[option] is not None and kind not in kinds:
      raise ValueError(
          f"--{option}={options[option]!r} does not apply to --{kind}; it "
          f"applies to {', '.join('--' + k for k in kinds)}. Drop it.")
  return kind


def _delimiter(value: str | None) -> str | None:
  if value is None:
    return None
  value = {"\\t": "\t", "tab": "\t"}.get(value, value)
  if len(value) != 1:
    raise ValueError(f"--delimiter={value!r}; expected one character (or "
                     "'tab', '\\t').")
  return value


# ----------------------------------------------------------------------------
# Conversion of samples (in worker processes when num_workers > 0).
# ----------------------------------------------------------------------------


def _read_file(path: str) -> bytes:
  """A local image file's bytes; raises _Skip."""
  try:
    info = os.stat(path)  # Before opening: a FIFO would block open().
    if not stat.S_ISREG(info.st_mode):
      raise _Skip("unreadable image", "not a regular file")
    if info.st_size > MAX_MEMBER_BYTES:
      raise _Skip(TOO_LARGE, f"{info.st_size:,} bytes > {MAX_MEMBER_BYTES:,}")
    with open(path, "rb") as f:
      return f.read(MAX_MEMBER_BYTES + 1)
  except FileNotFoundError as e:
    raise _Skip("caption without image", "file not found") from e
  except OSError as e:
    raise _Skip("unreadable image", repr(e)) from e


def _convert_sample(sample: Sample, image_size: int, image_format: str,
                    max_pixels: int | None):
  """(name, image path or bytes, captions) -> (encoded | None, reason)."""
  _, image, captions = sample
  if not captions:
    return None, ("empty caption", "")
  try:
    if isinstance(image, str):
      image = _read_file(image)
    return process_image(image, image_size, image_format, max_pixels), None
  except _Skip as e:
    return None, (e.reason, e.detail)
  except (ImageTooLargeError, Image.DecompressionBombError) as e:
    return None, (TOO_LARGE, str(e))
  except Image.UnidentifiedImageError:
    return None, ("corrupt image", "not a readable image of the formats "
                  f"{', '.join(_formats())}")
  except Exception as e:  # pylint: disable=broad-except
    # Untrusted bytes: Pillow raises many types (OSError, SyntaxError,
    # ValueError, struct.error, ...) on corrupt files.
    return None, ("corrupt image", repr(e))


def _convert_batch(samples: list[Sample], image_size: int, image_format: str,
                   max_pixels: int | None) -> list[tuple]:
  return [_convert_sample(s, image_size, image_format, max_pixels)
          for s in samples]


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
      "captions": tfds.features.Text(),
  })


def _shard_name(split: str, index: int, count: int) -> str:
  return (f"{DATASET_NAME}-{split}.array_record-{index:05d}-of-{count:05d}")


def _split_files(out: str, split: str) -> list[str]:
  pattern = re.compile(
      rf"^{DATASET_NAME}-{re.escape(split)}\.array_record-\d{{5}}-of-\d{{5}}$")
  return sorted(f for f in os.listdir(out) if pattern.match(f))


def _check_existing(out: str, image_size: int) -> None:
  """Another split in `out` must have this image size and feature set."""
  if not os.path.isfile(os.path.join(out, "features.json")):
    return
  features = tfds.features.FeatureConnector.from_config(out)
  existing = features["image"].shape[0]
  if existing != image_size:
    raise ValueError(
        f"{out} already holds {existing}x{existing} images; convert with "
        f"--image_size {existing} or into another --out directory.")
  if "captions" not in features:
    raise ValueError(
        f"{out} holds splits without the \"captions\" feature (written by an "
        "older converter); convert into another --out directory, or "
        "reconvert all its splits there.")


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


def _write_split(source: _Input, tmp_dir: str, split: str, *,
                 image_size: int, image_format: str, max_pixels: int | None,
                 num_shards: int, num_workers: int, stats: Stats,
                 progress: Progress) -> None:
  """Converts the samples into num_shards ArrayRecord files in tmp_dir."""
  features = _features(image_size, image_format)
  writers = [array_record_module.ArrayRecordWriter(
      os.path.join(tmp_dir, _shard_name(split, i, num_shards)),
      "group_size:1") for i in range(num_shards)]
  pool = None
  if num_workers > 0:
    # spawn: the parent may already run TF threads; fork could deadlock.
    pool = concurrent.futures.ProcessPoolExecutor(
        num_workers, mp_context=multiprocessing.get_context("spawn"))
  try:
    # Bounded windows keep memory flat for large inputs.
    window = max(1, num_workers) * 64
    for batch in _batches(source.samples, window):
      if pool is None:
        results = _convert_batch(batch, image_size, image_format, max_pixels)
      else:
        parts = [batch[i:i + 16] for i in range(0, len(batch), 16)]
        n = len(parts)
        results = [r for part in pool.map(
            _convert_batch, parts, [image_size] * n, [image_format] * n,
            [max_pixels] * n) for r in part]
      for (name, _, captions), (encoded, reason) in zip(batch, results):
        if encoded is None:
          stats.skip(name, *reason)
          continue
        # Round robin keeps shards equal in size.
        writers[stats.converted % num_shards].write(
            features.serialize_example({
                "image": encoded, "caption": captions[0],
                "captions": CAPTION_SEPARATOR.join(captions)}))
        stats.converted += 1
      progress.update(stats.converted + stats.skipped,
                      fraction=source.position.fraction)
  finally:
    if pool is not None:
      pool.shutdown(cancel_futures=True)
    for writer in writers:
      writer.close()


def convert(*, out: str, image_size: int, split: str = "train",
            images_dir: str | None = None, captions: str | None = None,
            tar_shards: str | None = None, csv: str | None = None,
            imagefolder: str | None = None, parquet: str | None = None,
            coco: str | None = None, image_column: str | None = None,
            caption_column: str | None = None, delimiter: str | None = None,
            num_shards: int = 1, num_workers: int = 0,
            image_format: str = "jpeg", max_pixels: int | None = None,
            progress_every: int = 1000) -> dict[str, Any]:
  """Converts one split into `out`; returns (and writes) the summary.

  Exactly one of captions, tar_shards, csv, imagefolder, parquet, coco is
  given (module docstring). max_pixels=None: default_max_pixels(). Progress
  (count, rate, fraction done, ETA) is logged every 10 s and every
  `progress_every` images.

  Raises:
    ValueError: conflicting or invalid arguments, or an input that cannot
      be read as its kind (e.g. a missing column), before `out` is created.
    ImportError: --parquet without pyarrow.
  """
  inputs = dict(captions=captions, tar_shards=tar_shards, csv=csv,
                imagefolder=imagefolder, parquet=parquet, coco=coco)
  kind = _check_arguments(inputs, dict(
      images_dir=images_dir, image_column=image_column,
      caption_column=caption_column, delimiter=delimiter))
  delimiter = _delimiter(delimiter)
  if image_size <= 0:
    raise ValueError(f"--image_size={image_size}; expected > 0.")
  if num_shards <= 0:
    raise ValueError(f"--num_shards={num_shards}; expected > 0.")
  if num_workers < 0:
    raise ValueError(f"--num_workers={num_workers}; expected >= 0.")
  if not re.fullmatch(r"[A-Za-z0-9_]+", split):
    raise ValueError(f"--split={split!r}; expected letters, digits, _.")
  if image_format not in ("jpeg", "png"):
    raise ValueError(f"--image_format={image_format!r}; expected jpeg|png.")
  pillow_limit = default_max_pixels()
  if max_pixels is None:
    max_pixels = pillow_limit
  elif pillow_limit is None and max_pixels <= 0:
    raise ValueError(f"--max_pixels={max_pixels}; expected > 0.")
  elif pillow_limit is not None and not 0 < max_pixels <= 2 * pillow_limit:
    raise ValueError(
        f"--max_pixels={max_pixels}; expected 1 to {2 * pillow_limit} "
        "(Pillow refuses images above twice Image.MAX_IMAGE_PIXELS).")
  if paths_lib.is_uri(out):
    raise ValueError(
        f"--out={out!r}: convert writes a local directory (its shards go "
        "through local temporary files and renames); convert into a local "
        "--out, then copy it (gsutil -m cp -r OUT gs://...) and point "
        "config.data.source there.")
  if os.path.exists(out) and not os.path.isdir(out):
    raise ValueError(f"--out={out!r} is a file; expected a directory.")
  if os.path.isdir(out):
    _check_existing(out, image_size)

  stats = Stats()
  start = time.time()
  source = _open_input(kind, inputs[kind], images_dir=images_dir,
                       image_column=image_column,
                       caption_column=caption_column, delimiter=delimiter,
                       stats=stats)
  progress = Progress(None, what="Processed images",
                      every_items=progress_every)
  created = not os.path.exists(out)
  os.makedirs(out, exist_ok=True)
  tmp_dir = os.path.join(out, f".tmp-{split}")
  try:
    shutil.rmtree(tmp_dir, ignore_errors=True)  # Left by a killed run.
    os.makedirs(tmp_dir)
    _write_split(source, tmp_dir, split, image_size=image_size,
                 image_format=image_format, max_pixels=max_pixels,
                 num_shards=num_shards, num_workers=num_workers, stats=stats,
                 progress=progress)
    if source.walk is not None:
      _unreferenced_images(source.walk, source.referenced, stats)
    progress.finish(stats.converted + stats.skipped)
    if stats.converted:
      for old in _split_files(out, split):
        os.remove(os.path.join(out, old))
      for file in os.listdir(tmp_dir):
        os.replace(os.path.join(tmp_dir, file), os.path.join(out, file))
      _write_metadata(out, image_size, image_format)
  except BaseException:
    shutil.rmtree(tmp_dir, ignore_errors=True)
    if created and not os.listdir(out):
      os.rmdir(out)
    raise
  shutil.rmtree(tmp_dir, ignore_errors=True)

  summary = {
      "out": os.path.abspath(out),
      "split": split,
      "input": {kind: inputs[kind]},
      "image_size": image_size,
      "max_pixels": max_pixels,
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
