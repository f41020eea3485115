r"""Trains a SentencePiece text tokenizer (T5 layout: pad 0, eos 1, unk 2).

Example: python -m unimm.tools.train_text_tokenizer --output DIR/spiece \
    --vocab_size 256 --source shapes --num_captions 20000
Example: python -m unimm.tools.train_text_tokenizer --output DIR/spiece \
    --vocab_size 8000 --captions_file PartiPrompts.tsv
Example: python -m unimm.tools.train_text_tokenizer --output DIR/spiece \
    --vocab_size 256 --data data/mine --data_split train

Writes PREFIX.model and PREFIX.vocab (unimm.tokenizers.text) and prints the
tokens per caption, to set config.text_length by. Built-in sources: shapes
captions, or the texts (captions and edit instructions) of interleaved
documents; or a captions file; or every caption of a split of a data set
converted by unimm.tools.convert (--data).
"""
from collections.abc import Sequence

from absl import app
from absl import flags
from absl import logging
import numpy as np

from unimm.data import interleaved
from unimm.data import pipeline
from unimm.data import shapes
from unimm.tokenizers import text as text_lib

SOURCES = ("shapes", "interleaved")


def source_texts(source: str, num: int, seed: int = 0,
                 kinds=interleaved.DEFAULT_KINDS) -> list[str]:
  """Training texts of a built-in source: `num` shapes captions, or the
  texts of `num` interleaved documents of `kinds`
  (interleaved.document_texts)."""
  if source == "shapes":
    _, captions, _ = shapes.generate(num, seed)
    return [str(c) for c in captions]
  if source == "interleaved":
    return interleaved.document_texts(num, seed, kinds)
  raise ValueError(f"--source={source!r}; expected one of {SOURCES}.")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """The CLI flags (defined only when run as a program, or by tests)."""
  kw = dict(flag_values=flag_values)
  flags.DEFINE_string("output", None, "Output prefix; writes PREFIX.model.",
                      required=True, **kw)
  flags.DEFINE_integer("vocab_size", 256, "Pieces in the vocabulary.", **kw)
  flags.DEFINE_enum("source", None, list(SOURCES),
                    "Built-in text source (or use --captions_file): shapes "
                    "captions, or the texts (captions and edit "
                    "instructions) of interleaved documents.", **kw)
  flags.DEFINE_list("kinds", list(interleaved.DEFAULT_KINDS),
                    "With --source=interleaved: the document kinds whose "
                    f"texts to learn, of {interleaved.KINDS} (as "
                    "pack_interleaved --kinds).", **kw)
  flags.DEFINE_integer("num_captions", 20000,
                       "Captions (shapes) or documents (interleaved) drawn "
                       "from --source.", **kw)
  flags.DEFINE_string("captions_file", None,
                      "One caption per line, or a TSV with a Prompt column.",
                      **kw)
  flags.DEFINE_string("data", None,
                      "A directory written by unimm.tools.convert: trains on "
                      "every caption of its --data_split.", **kw)
  flags.DEFINE_string("data_split", "train",
                      "The split of --data (TFDS slicing allowed, e.g. "
                      "train[:-200]).", **kw)
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"],
                    "SentencePiece model type (see train_sentencepiece).",
                    **kw)
  flags.DEFINE_bool("hard_vocab_limit", False,
                    "Fail instead of shrinking the vocabulary when the "
                    "corpus is too small.", **kw)
  flags.DEFINE_integer("seed", 0, "Seed for caption generation and "
                       "training.", **kw)
  flags.DEFINE_integer("num_threads", 1, "SentencePiece trainer threads.",
                       **kw)


def main(argv: Sequence[str],
         flag_values: flags.FlagValues = flags.FLAGS) -> str:
  """Trains from parsed flags; returns the .model path."""
  if len(argv) > 1:
    raise ValueError(f"Unexpected arguments: {argv[1:]}")
  flag = flag_values
  given = [name for name in ("source", "captions_file", "data")
           if flag[name].value is not None]
  if len(given) != 1:
    raise ValueError(
        f"Got {['--' + name for name in given] or 'none'}; pass exactly one "
        "of --source=shapes|interleaved, --captions_file=FILE or "
        "--data=DIR.")
  if flag.captions_file:
    captions = text_lib.read_prompts(flag.captions_file)
  elif flag.data:
    captions = pipeline.read_captions(flag.data, flag.data_split,
                                      setting="--data")
  else:
    captions = source_texts(flag.source, flag.num_captions, flag.seed,
                            flag.kinds)
  logging.info("Training a %s SentencePiece model (vocab_size=%d) on %d "
               "captions.", flag.model_type, flag.vocab_size, len(captions))
  path = text_lib.train_sentencepiece(
      captions, flag.vocab_size, flag.output, model_type=flag.model_type,
      hard_vocab_limit=flag.hard_vocab_limit, seed=flag.seed,
      num_threads=flag.num_threads)
  tokenizer = text_lib.TextTokenizer.load(path)
  lengths = tokenizer.count_tokens(captions) + 1  # [N], EOS included.
  summary = (f"Wrote {path}: vocab_size={tokenizer.vocab_size}; tokens per "
             f"caption incl. EOS: mean {lengths.mean():.1f}, p99 "
             f"{np.percentile(lengths, 99):.0f}, max {lengths.max()} (set "
             "config.text_length to cover them).")
  logging.info(summary)
  print(summary)
  return path


if __name__ == "__main__":
  define_flags()
  app.run(lambda argv: main(argv) and None)  # exit status 0, not the path
