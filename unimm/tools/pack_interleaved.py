r"""Writes interleaved documents, tokenized and packed into rows.

Example: python -m unimm.tools.pack_interleaved \
      --tokenizer_workdir WORKDIRS/tokenizer \
      --text_tokenizer WORKDIRS/spiece.model --out WORKDIRS/interleaved \
      --split train --num_documents 100000 --length 512
writes shapes documents (captions, images, edit stories); the (image,
caption) pairs of your own converted data set, each as a caption->image
and an image->caption document:
  python -m unimm.tools.pack_interleaved --source DIR --split train \
      --tokenizer_workdir W/tokenizer --text_tokenizer W/text/spiece.model \
      --out W/data --length 160 [--image_input patches --patch_size 4]

Loads the tokenizer (unimm.api.load_tokenizer) and runs
unimm.data.interleaved.write_interleaved (shapes) or write_pairs (--source
DIR), which describe the documents, tokens and packing; prints the
metadata (also in OUT/SPLIT.json). Train the text tokenizer on these
documents' texts first (unimm.tools.train_text_tokenizer --source
interleaved, or --data DIR for a converted set).
"""
import json

from absl import app
from absl import flags
from absl import logging

from unimm import api
from unimm import host_memory
from unimm.data import grounding
from unimm.data import interleaved
from unimm.data import pretokenize
from unimm.models import image_input


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  kw = dict(flag_values=flag_values)
  flags.DEFINE_string("tokenizer_workdir", None, "Workdir of a trained "
                      "ViT-VQGAN (config.task vit_vqgan).", required=True,
                      **kw)
  flags.DEFINE_string("text_tokenizer", None, "SentencePiece .model file.",
                      required=True, **kw)
  flags.DEFINE_string("out", None, "Output directory.", required=True, **kw)
  flags.DEFINE_string("split", "train", "Split name.", **kw)
  flags.DEFINE_string("source", "shapes", "shapes (generated documents) or "
                      "a directory written by unimm.tools.convert (its "
                      "pairs as caption->image and image->caption "
                      "documents).", **kw)
  flags.DEFINE_string("read_split", None, "With --source DIR: the split to "
                      "read (TFDS slicing allowed; default --split).", **kw)
  flags.DEFINE_integer("num_documents", None, "Shapes documents to write "
                       "(required for --source shapes); with --source DIR "
                       "the first num_documents / 2 pairs (default all).",
                       **kw)
  flags.DEFINE_integer("length", None, "Tokens per packed row "
                       "(config.model.max_len).", required=True, **kw)
  flags.DEFINE_integer("seed", None, "Document stream (default: train 0, "
                       "validation 1, test 2).", **kw)
  flags.DEFINE_list("kinds", list(interleaved.DEFAULT_KINDS), "Document "
                    f"kinds, of {interleaved.KINDS} "
                    "(pairs of --source DIR make caption_image and "
                    "image_caption ones only).", **kw)
  flags.DEFINE_list("weights", None, "Weights of --kinds (default uniform).",
                    **kw)
  flags.DEFINE_integer("documents_per_batch", 1024, "Documents tokenized and "
                       "packed together.", **kw)
  flags.DEFINE_integer("encode_batch_size", 256, "Images per encoder call.",
                       **kw)
  flags.DEFINE_integer("records_per_shard", pretokenize.RECORDS_PER_SHARD,
                       "Packed rows per ArrayRecord shard.", **kw)
  flags.DEFINE_enum("image_input", "codes", list(image_input.IMAGE_INPUTS),
                    "How the model reads the image opening a document "
                    "(config.model.image_input; unimm.models.image_input).",
                    **kw)
  flags.DEFINE_integer("patch_size", 4, "Pixels per patch side (patches; "
                       "the resampler's rows carry patches too).", **kw)
  flags.DEFINE_integer("num_queries", 16, "READ slots per image (resampler).",
                       **kw)
  flags.DEFINE_integer("location_bins", grounding.DEFAULT_BINS, "Cells a "
                       "side of the location grid of refer, grounded_caption "
                       "and draw_box boxes (Kosmos-2 uses 32); train with "
                       "the same config arg bins=.", **kw)


def main(argv, flag_values: flags.FlagValues = flags.FLAGS) -> dict:
  """Runs write_interleaved from parsed flags; returns the metadata."""
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  f = flag_values
  weights = None if f.weights is None else [float(w) for w in f.weights]
  setting = image_input.ImageInput(f.image_input, f.patch_size,
                                   f.num_queries)
  tokenizer = api.load_tokenizer(f.tokenizer_workdir)
  if f.source != "shapes":
    metadata = interleaved.write_pairs(
        tokenizer, f.text_tokenizer, f.out, f.split, source=f.source,
        length=f.length, read_split=f.read_split,
        num_examples=(None if f.num_documents is None
                      else max(1, f.num_documents // 2)),
        seed=0 if f.seed is None else f.seed,
        kinds=[k for k in f.kinds if k in interleaved.PAIR_KINDS],
        encode_batch_size=f.encode_batch_size,
        records_per_shard=f.records_per_shard,
        tokenizer_workdir=f.tokenizer_workdir, image_input=setting)
    print(json.dumps(metadata, indent=1))
    return metadata
  if f.num_documents is None:
    raise ValueError("--num_documents is required with --source shapes "
                     "(the number of generated documents to write).")
  metadata = interleaved.write_interleaved(
      tokenizer, f.text_tokenizer, f.out,
      f.split, f.num_documents, f.length, seed=f.seed, kinds=f.kinds,
      weights=weights, documents_per_batch=f.documents_per_batch,
      encode_batch_size=f.encode_batch_size,
      records_per_shard=f.records_per_shard,
      tokenizer_workdir=f.tokenizer_workdir, image_input=setting,
      location_bins=f.location_bins)
  print(json.dumps(metadata, indent=1))
  return metadata


if __name__ == "__main__":
  host_memory.keep_freed_memory()
  define_flags()
  app.run(lambda argv: main(argv) and None)  # exit status 0, not the dict
