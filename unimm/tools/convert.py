r"""Converts own images + captions into an ArrayRecord data set.

Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --images_dir IMAGES --captions captions.jsonl [--split train]
Example: python -m unimm.tools.convert --out DIR --image_size 256 \
    --tar_shards 'shards/*.tar' [--num_shards 64] [--split validation]

Then train with config.data.source=DIR (and config.data.image_size=256).
Inputs, processing and the output format: unimm.data.convert. Prints the
summary (also in DIR/convert_summary.json); exits 1 if no image converted.
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
  flags.DEFINE_integer("progress_every", 1000, "Log progress every N images "
                       "(and every 10 s).", flag_values=flag_values)
  flags.mark_flags_as_required(["out", "image_size"], flag_values=flag_values)


def run(flag_values: flags.FlagValues = flags.FLAGS) -> int:
  """Runs the conversion from parsed flags; prints the summary."""
  summary = convert.convert(
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
