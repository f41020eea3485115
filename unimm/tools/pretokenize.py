r"""Pre-tokenizes a data set: encodes its images once with a frozen ViT-VQGAN.

Example: python -m unimm.tools.pretokenize \
    --tokenizer_workdir WORKDIRS/tokenizer \
    --text_tokenizer WORKDIRS/spiece.model --source shapes --split train \
    --out WORKDIRS/pretokenized [--text_length 24] [--num_examples N]

Loads the tokenizer (unimm.api.load_tokenizer) and runs
unimm.data.pretokenize.pretokenize, which describes the output (ArrayRecord
shards + SPLIT.json); prints the metadata.
"""
import json

from absl import app
from absl import flags
from absl import logging

from unimm import api
from unimm import host_memory
from unimm.data import pretokenize


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  kw = dict(flag_values=flag_values)
  flags.DEFINE_string("tokenizer_workdir", None,
                      "Workdir of a trained ViT-VQGAN (config.task "
                      "vit_vqgan).", required=True, **kw)
  flags.DEFINE_string("text_tokenizer", None, "SentencePiece .model file.",
                      required=True, **kw)
  flags.DEFINE_string("source", "shapes", "shapes, shapes_small, "
                      "shapes_large or a directory from unimm.tools.convert.",
                      **kw)
  flags.DEFINE_string("split", "train", "Split to encode.", **kw)
  flags.DEFINE_string("out", None, "Output directory.", required=True, **kw)
  flags.DEFINE_integer("text_length", 24, "Text ids per caption "
                       "(config.model.text_length).", **kw)
  flags.DEFINE_integer("num_examples", None, "Encode only the first N.", **kw)
  flags.DEFINE_integer("batch_size", 256, "Images per encoder call.", **kw)
  flags.DEFINE_integer("image_size", None, "Image size (default: the "
                       "tokenizer's).", **kw)
  flags.DEFINE_string("data_dir", None, "TFDS data dir for shapes sources.",
                      **kw)
  flags.DEFINE_integer("records_per_shard", pretokenize.RECORDS_PER_SHARD,
                       "Examples per ArrayRecord shard.", **kw)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs pretokenize from parsed flags; returns (and prints) the metadata."""
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flag_values
  metadata = pretokenize.pretokenize(
      api.load_tokenizer(f.tokenizer_workdir), f.text_tokenizer, f.source,
      f.split, f.out, f.text_length, f.num_examples, f.batch_size,
      image_size=f.image_size, data_dir=f.data_dir,
      records_per_shard=f.records_per_shard,
      tokenizer_workdir=f.tokenizer_workdir)
  print(json.dumps(metadata, indent=1))
  return metadata


if __name__ == "__main__":
  host_memory.keep_freed_memory()
  define_flags()
  app.run(lambda argv: main(argv) and None)  # exit status 0, not the dict
