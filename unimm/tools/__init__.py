"""Command-line tools (the apps layer): each module's main() parses flags
and calls a library function; `python -m unimm.tools.NAME --help` lists
its flags.

  convert               own images + captions -> ArrayRecord (unimm.data.convert)
  build_shapes          build the unimm_shapes TFDS data set ahead of time
  train_text_tokenizer  train a SentencePiece model (unimm.tokenizers.text)
  pretokenize           encode a data set's images once (unimm.data.pretokenize)
  pack_interleaved      tokenize and pack interleaved documents
                        (unimm.data.interleaved)
"""
