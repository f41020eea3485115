"""Text tokenizer for captions and prompts: a thin SentencePiece wrapper.

Parti's encoder input and the interleaved model's text spans are SentencePiece
ids. `TextTokenizer.load` reads any SentencePiece `.model` file (T5's
`spiece.model`, or one trained here); `train_sentencepiece` trains one from
an in-memory corpus with T5's special-id layout (pad=0, eos=1, unk=2, no bos),
deterministically.

Unicode: SentencePiece normalises every input with its model's normalisation
rule (by default `nmt_nfkc`: Unicode NFKC plus whitespace clean-up) before
splitting it, so e.g. "ﬁ" and "fi", or full-width and ASCII letters, get the
same ids, and `decode(encode(x))` returns the normalised text, not always x.

Train from the command line (unimm/tools/train_text_tokenizer.py):

  python -m unimm.tools.train_text_tokenizer --output DIR/spiece \
      --vocab_size 256 --source shapes --num_captions 20000
  python -m unimm.tools.train_text_tokenizer --output DIR/spiece \
      --vocab_size 8000 --captions_file PartiPrompts.tsv
"""
from __future__ import annotations

import csv
import dataclasses
import io
import re
from collections.abc import Iterable, Sequence
from typing import Any

from absl import logging
from etils import epath
import numpy as np
import sentencepiece as spm

# T5's layout (and unimm's): pad=0, eos=1, unk=2, no bos.
T5_PAD_ID, T5_EOS_ID, T5_UNK_ID, T5_BOS_ID = 0, 1, 2, -1

_TOO_HIGH = re.compile(r"Please set it to a value <= (\d+)")
_TOO_LOW = re.compile(r"smaller than required_chars\. \d+ vs (\d+)")


@dataclasses.dataclass(frozen=True)
class EncodedText:
  """A padded batch of token ids.

  Attributes:
    ids: int32 [N, max_len], padded with the tokenizer's pad_id.
    lengths: int32 [N], tokens per row before padding (EOS included).
    num_truncated: how many texts were longer than max_len and were cut.
  """
  ids: np.ndarray  # [N, L] int32
  lengths: np.ndarray  # [N] int32
  num_truncated: int


class TextTokenizer:
  """A SentencePiece model with fixed-length batch encode/decode.

  Picklable (it pickles the serialized model), so it can travel into grain
  worker processes.
  """

  def __init__(self, model_proto: bytes):
    self._proto = bytes(model_proto)
    self._sp = spm.SentencePieceProcessor(model_proto=self._proto)
    self._pad_id = self._sp.pad_id()
    if self._pad_id < 0:
      # Models trained with SentencePiece's defaults have no pad piece; pad
      # with EOS instead: decode stops at the first EOS, so it is never read.
      self._pad_id = self._sp.eos_id()
    if self._pad_id < 0:
      raise ValueError(
          "The SentencePiece model has neither a pad nor an eos piece "
          "(pad_id=-1, eos_id=-1), so batches cannot be padded; expected a "
          "model trained with pad_id or eos_id >= 0 (e.g. T5's spiece.model "
          "or one from unimm.tokenizers.text.train_sentencepiece).")

  @classmethod
  def load(cls, path: str | epath.PathLike) -> TextTokenizer:
    """Reads a SentencePiece `.model` file (local path or gs://...)."""
    path = epath.Path(path)
    if not path.exists():
      raise ValueError(
          f"No SentencePiece model at {str(path)!r}; expected a .model file "
          "such as T5's spiece.model or one written by "
          "`python -m unimm.tools.train_text_tokenizer --output PREFIX` "
          "(PREFIX.model).")
    try:
      return cls(path.read_bytes())
    except RuntimeError as e:  # sentencepiece's parse error.
      raise ValueError(
          f"{str(path)!r} is not a valid SentencePiece model: {e}") from e

  @property
  def model_proto(self) -> bytes:
    """The serialized model (store it with a checkpoint to reload exactly)."""
    return self._proto

  @property
  def vocab_size(self) -> int:
    return self._sp.vocab_size()

  @property
  def pad_id(self) -> int:
    return self._pad_id

  @property
  def eos_id(self) -> int:
    return self._sp.eos_id()

  @property
  def bos_id(self) -> int:
    """-1 when the model has no BOS piece (T5's layout)."""
    return self._sp.bos_id()

  @property
  def unk_id(self) -> int:
    return self._sp.unk_id()

  def __getstate__(self) -> dict[str, Any]:
    return {"model_proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__init__(state["model_proto"])

  def __repr__(self) -> str:
    return (f"TextTokenizer(vocab_size={self.vocab_size}, pad_id={self.pad_id},"
            f" eos_id={self.eos_id}, bos_id={self.bos_id}, "
            f"unk_id={self.unk_id})")

  def encode(self, texts: Sequence[str | bytes], max_len: int,
             add_eos: bool = True) -> EncodedText:
    """Tokenizes a batch into fixed-length rows.

    Text is NFKC-normalised by SentencePiece first (see the module doc).
    Texts longer than max_len keep their first max_len - 1 tokens plus EOS
    (or their first max_len tokens when add_eos=False); how many were cut is
    returned and logged as a warning.

    Args:
      texts: N prompts, str or UTF-8 bytes (a numpy array of them is fine).
      max_len: the row length (config.text_length).
      add_eos: append EOS to every row.

    Returns:
      EncodedText with ids int32 [N, max_len], lengths int32 [N] and
      num_truncated.
    """
    texts = _check_texts(texts)
    min_len = 2 if add_eos else 1
    if int(max_len) != max_len or max_len < min_len:
      raise ValueError(
          f"max_len={max_len!r}; expected an int >= {min_len} (it is "
          "config.text_length / --text_length).")
    if add_eos and self.eos_id < 0:
      raise ValueError("add_eos=True but the SentencePiece model has no EOS "
                       "piece (eos_id=-1); pass add_eos=False.")
    max_len = int(max_len)
    pieces = self._sp.encode(texts, out_type=int)
    body_len = max_len - 1 if add_eos else max_len
    ids = np.full((len(texts), max_len), self.pad_id, np.int32)  # [N, L]
    lengths = np.zeros((len(texts),), np.int32)  # [N]
    truncated = []  # (row, tokens before truncation)
    for row, tokens in enumerate(pieces):
      if len(tokens) > body_len:
        truncated.append((row, len(tokens)))
        tokens = tokens[:body_len]
      if add_eos:
        tokens = tokens + [self.eos_id]
      ids[row, :len(tokens)] = tokens
      lengths[row] = len(tokens)
    num_truncated = len(truncated)
    if num_truncated:
      which = ", ".join(f"prompt {row}: {n} tokens"
                        for row, n in truncated[:5])
      logging.warning(
          "%d of %d prompts were longer than text length %d (%d tokens%s) "
          "and were truncated to their first %d tokens (%s%s); raise "
          "config.text_length (--text_length) to keep them whole.",
          num_truncated, len(texts), max_len, body_len,
          " + EOS" if add_eos else "", body_len, which,
          ", ..." if num_truncated > 5 else "")
    return EncodedText(ids=ids, lengths=lengths, num_truncated=num_truncated)

  def pieces(self, texts: Sequence[str | bytes]) -> list[np.ndarray]:
    """Each text's ids, unpadded and without EOS: int32 [L_i] per text."""
    return [np.asarray(p, np.int32)
            for p in self._sp.encode(_check_texts(texts), out_type=int)]

  def count_tokens(self, texts: Sequence[str | bytes]) -> np.ndarray:
    """Tokens per text, EOS not counted: int32 [N] (to pick text_length)."""
    pieces = self._sp.encode(_check_texts(texts), out_type=int)
    return np.array([len(p) for p in pieces], np.int32)

  def decode(self, ids: Any) -> list[str]:
    """Detokenizes rows of ids [N, L], each stopping at its first EOS/pad."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
      raise ValueError(
          f"decode expects integer ids of shape [N, L]; got dtype {ids.dtype}"
          f" and shape {ids.shape} (wrap one sequence as [ids]).")
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(
          f"Token ids range over [{ids.min()}, {ids.max()}]; expected ids in "
          f"[0, {self.vocab_size}) (text vocab_size). Map the model's "
          "vocabulary back to text ids before decoding.")
    stops = {self.pad_id, self.eos_id} - {-1}
    texts = []
    for row in ids.tolist():
      end = next((i for i, t in enumerate(row) if t in stops), len(row))
      texts.append(self._sp.decode(row[:end]))
    return texts


def _check_texts(texts: Any) -> list[str]:
  """Validates a batch of prompts; returns them as a list of str."""
  if isinstance(texts, (str, bytes)):
    raise ValueError(
        f"Expected a sequence of prompts, got a single {type(texts).__name__}"
        f" ({texts[:40]!r}); wrap it in a list.")
  if isinstance(texts, np.ndarray) and texts.ndim != 1:
    raise ValueError(
        f"Expected a 1-D batch of prompts, got an array of shape "
        f"{texts.shape}.")
  checked = []
  for index, text in enumerate(texts):
    if isinstance(text, bytes):
      try:
        text = text.decode("utf-8")
      except UnicodeDecodeError as e:
        raise ValueError(
            f"Prompt {index} is not valid UTF-8 ({e.reason} at byte "
            f"{e.start}: {text[:40]!r}); prompts must be UTF-8 text.") from e
    elif not isinstance(text, str):
      raise ValueError(
          f"Prompt {index} is a {type(text).__name__} ({text!r:.40}); "
          "expected str or UTF-8 bytes.")
    if not text.strip():
      raise ValueError(
          f"Prompt {index} is empty ({text!r}); every prompt needs at least "
          "one non-space character (drop it or use a placeholder caption).")
    checked.append(str(text))
  return checked


def train_sentencepiece(
    texts: Iterable[str],
    vocab_size: int,
    output_prefix: str,
    *,
    model_type: str = "bpe",
    character_coverage: float = 1.0,
    hard_vocab_limit: bool = False,
    byte_fallback: bool = False,
    input_sentence_size: int = 0,
    seed: int = 0,
    num_threads: int = 1,
) -> str:
  """Trains a SentencePiece model with T5's ids; writes PREFIX.model/.vocab.

  Deterministic: the same texts and arguments give byte-identical models
  (fixed random seed; one thread by default so the result cannot depend on
  thread scheduling).

  Args:
    texts: the corpus, one caption per item (blank ones are skipped).
    vocab_size: pieces wanted (config.text_vocab_size / --vocab_size).
    output_prefix: where to write (local or gs://); `.model` is appended.
    model_type: "bpe" or "unigram" (T5's). BPE is the default because
      SentencePiece's unigram trainer collapses on small closed-vocabulary
      corpora: on 5,000 shapes-like captions it stops at 42 pieces, mostly
      characters (37 tokens per caption), where BPE learns every word (209
      pieces, 12 tokens per caption); on PartiPrompts with 1,000 pieces the
      two are equal (14.7 vs 14.6 tokens per prompt).
    character_coverage: fraction of characters covered (1.0 keeps all).
    hard_vocab_limit: if False, a corpus too small for vocab_size yields a
      smaller vocabulary (logged); if True, that raises ValueError.
    byte_fallback: map unknown characters to byte pieces instead of unk
      (adds 256 pieces, so vocab_size must exceed that).
    input_sentence_size: sample this many sentences (0 = use all).
    seed: seeds SentencePiece's sampling.
    num_threads: trainer threads.

  Returns:
    The path of the written .model file.
  """
  if model_type not in ("unigram", "bpe"):
    raise ValueError(f"model_type={model_type!r}; expected 'unigram' or "
                     "'bpe' (--model_type).")
  if vocab_size < 4:
    raise ValueError(
        f"vocab_size={vocab_size}; expected >= 4 (3 special pieces plus text"
        ". Set config.text_vocab_size / --vocab_size).")

  def sentences():
    for text in texts:
      text = text.strip()
      if text:
        yield text

  spm.set_random_generator_seed(seed)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences(),
        model_writer=model,
        model_type=model_type,
        vocab_size=vocab_size,
        character_coverage=character_coverage,
        hard_vocab_limit=hard_vocab_limit,
        byte_fallback=byte_fallback,
        input_sentence_size=input_sentence_size,
        shuffle_input_sentence=True,
        num_threads=num_threads,
        pad_id=T5_PAD_ID, eos_id=T5_EOS_ID, unk_id=T5_UNK_ID,
        bos_id=T5_BOS_ID,
        pad_piece="<pad>", eos_piece="</s>", unk_piece="<unk>",
        minloglevel=2,
    )
  except RuntimeError as e:
    message = str(e)
    too_high = _TOO_HIGH.search(message)
    if too_high:
      raise ValueError(
          f"vocab_size={vocab_size} is too large for this corpus: it "
          f"supports at most {too_high.group(1)} pieces. Lower "
          "config.text_vocab_size / --vocab_size, add captions, or pass "
          "hard_vocab_limit=False.") from e
    too_low = _TOO_LOW.search(message)
    if too_low:
      raise ValueError(
          f"vocab_size={vocab_size} is too small for this corpus: its "
          f"characters alone need {too_low.group(1)} pieces. Raise "
          "config.text_vocab_size / --vocab_size to at least that, or lower "
          "character_coverage.") from e
    if "sentences_.empty()" in message:
      raise ValueError("Cannot train a SentencePiece model on an empty "
                       "corpus: every caption was blank.") from e
    raise
  tokenizer = TextTokenizer(model.getvalue())
  if tokenizer.vocab_size < vocab_size:
    logging.warning(
        "The corpus supports only %d pieces; trained a vocabulary of %d "
        "instead of vocab_size=%d (config.text_vocab_size may stay larger).",
        tokenizer.vocab_size, tokenizer.vocab_size, vocab_size)
  path = epath.Path(str(output_prefix) + ".model")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_bytes(tokenizer.model_proto)
  sp = spm.SentencePieceProcessor(model_proto=tokenizer.model_proto)
  vocab_lines = (f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n"
                 for i in range(sp.vocab_size()))
  epath.Path(str(output_prefix) + ".vocab").write_text("".join(vocab_lines))
  return str(path)


def read_prompts(path: str | epath.PathLike) -> list[str]:
  """Reads prompts: one per line, or a TSV with a "Prompt" header column.

  A file is read as TSV when its name ends in .tsv or its first line has a
  tab (PartiPrompts.tsv: Prompt, Category, Challenge, Note). Blank lines are
  skipped; quotes are kept as part of the prompt.
  """
  path = epath.Path(path)
  data = path.read_bytes()
  try:
    text = data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise ValueError(f"{str(path)!r} line {line} is not valid UTF-8 "
                     f"({e.reason}); prompts files must be UTF-8.") from e
  lines = text.splitlines()
  first = next((line for line in lines if line.strip()), "")
  if not (path.name.endswith(".tsv") or "\t" in first):
    return [line.strip() for line in lines if line.strip()]
  rows = [row for row in csv.reader(lines, delimiter="\t",
                                    quoting=csv.QUOTE_NONE) if any(row)]
  if not rows:
    return []
  header = [name.strip() for name in rows[0]]
  columns = [i for i, name in enumerate(header) if name.lower() == "prompt"]
  if not columns:
    raise ValueError(
        f"{str(path)!r} looks like a TSV but its header {header} has no "
        "'Prompt' column; expected a header such as PartiPrompts' "
        "'Prompt\\tCategory\\tChallenge\\tNote', or one prompt per line "
        "without tabs.")
  column = columns[0]
  prompts = []
  for row in rows[1:]:
    if column < len(row) and row[column].strip():
      prompts.append(row[column].strip())
  return prompts
