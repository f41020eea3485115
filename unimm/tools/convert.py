r"""Converts own images + captions into an ArrayRecord data set.

Give exactly one input: --captions, --tar_shards, --csv, --imagefolder,
--parquet or --coco.

Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --images_dir IMAGES --captions captions.jsonl [--split train]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --tar_shards 'shards/*.tar' [--num_shards 64] [--split validation]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --csv cc3m.tsv --images_dir IMAGES [--image_column image] \
    [--caption_column caption]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --imagefolder my_imagefolder/train [--caption_column text]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --parquet 'data/train-*.parquet' [--image_column image]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --coco annotations/captions_train2017.json --images_dir train2017

Then train with config.data.source=DIR (and config.data.image_size=256).
Inputs, processing, the bomb guard (--max_pixels) and the output format
(including the "captions" feature with every caption of an image):
unimm.data.convert. Prints the summary (also in DIR/convert_summary.json);
exits 1 if no image converted.
"""
import json
import os
import sys

from absl import app
from absl import flags
from absl import logging

from unimm.data import convert


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  flags.DEFINE_string("out", None, "Output directory.", flag_values=flag_values)
  flags.DEFINE_integer("image_size", None, "Output images are square, this "
                       "many pixels a side.", flag_values=flag_values)
  flags.DEFINE_string("captions", None, 'Input: JSON lines {"image": path, '
                      '"caption": text}.', flag_values=flag_values)
  flags.DEFINE_string("tar_shards", None, "Input: glob of webdataset / "
                      "img2dataset tar shards (KEY.jpg + KEY.txt).",
                      flag_values=flag_values)
  flags.DEFINE_string("csv", None, "Input: CSV or TSV (by extension, or "
                      "--delimiter) with a header row; local image paths.",
                      flag_values=flag_values)
  flags.DEFINE_string("imagefolder", None, "Input: Hugging Face imagefolder "
                      "directory (metadata.jsonl / metadata.csv with "
                      "file_name).", flag_values=flag_values)
  flags.DEFINE_string("parquet", None, "Input: glob of parquet shards "
                      "(image bytes or {bytes, path} structs; needs "
                      "pyarrow).", flag_values=flag_values)
  flags.DEFINE_string("coco", None, "Input: COCO captions JSON (with "
                      "--images_dir).", flag_values=flag_values)
  flags.DEFINE_string("images_dir", None, "Root of relative image paths "
                      "(--captions, --coco; --csv: default the file's folder; "
                      "--parquet: default the shard's folder).",
                      flag_values=flag_values)
  flags.DEFINE_string("image_column", None, "Column / key of the image: "
                      "default image (--captions, --csv), file_name "
                      "(--imagefolder), image else jpg (--parquet).",
                      flag_values=flag_values)
  flags.DEFINE_string("caption_column", None, "Column / key of the caption: "
                      "default caption (--captions, --csv), text else caption "
                      "(--imagefolder), caption else text (--parquet).",
                      flag_values=flag_values)
  flags.DEFINE_string("delimiter", None, "--csv field delimiter (one "
                      "character, or tab); default: tab for .tsv, else comma.",
                      flag_values=flag_values)
  flags.DEFINE_integer("max_pixels", None, "Images whose header says more "
                       "pixels (width x height) are skipped undecoded; "
                       "default Pillow's Image.MAX_IMAGE_PIXELS "
                       f"({convert.default_max_pixels()}), at most twice it.",
                       flag_values=flag_values)
  flags.DEFINE_integer("num_shards", 16, "Output ArrayRecord shards.",
                       flag_values=flag_values)
  flags.DEFINE_string("split", "train", "Split name to write.",
                      flag_values=flag_values)
  flags.DEFINE_integer("num_workers", os.cpu_count() or 1, "Image decoding "
                       "processes (0 = in this process; each takes seconds to "
                       "start, so 0 is faster for a few thousand images).",
                       flag_values=flag_values)
  flags.DEFINE_enum("image_format", "jpeg", ["jpeg", "png"], "Stored "
                    "encoding (jpeg: quality 95).", flag_values=flag_values)
  flags.DEFINE_integer("progress_every", 1000, "Log progress every N images "
                       "(and every 10 s).", flag_values=flag_values)
  flags.mark_flags_as_required(["out", "image_size"], flag_values=flag_values)


def run(flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the conversion from parsed flags; prints the summary."""
  summary = convert.convert(
      out=flag_values.out, image_size=flag_values.image_size,
      split=flag_values.split, images_dir=flag_values.images_dir,
      **{kind: flag_values[kind].value for kind in convert.INPUTS},
      image_column=flag_values.image_column,
      caption_column=flag_values.caption_column,
      delimiter=flag_values.delimiter, max_pixels=flag_values.max_pixels,
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
  except (ValueError, ImportError) as e:
    raise app.UsageError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
