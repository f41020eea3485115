"""Tests for unimm.tokenizers.text (SentencePiece captions/prompts)."""
import logging
import os
import pathlib
import pickle
import random

import numpy as np
import pytest

from unimm.tokenizers import text as text_lib

# The real PartiPrompts file lives in the shared folder beside the checkout.
PARTI_PROMPTS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
        __file__)))), os.pardir, "shared", "data", "PartiPrompts.tsv")
_COLOURS = ["red", "green", "blue", "yellow", "purple", "orange", "white"]
_SHAPES = ["circle", "square", "triangle", "star"]
_PLACES = ["at the top left", "at the top right", "in the center",
           "at the bottom left", "at the bottom right"]


def shapes_like_captions(num, seed=0):
  rng = random.Random(seed)

  def one():
    return (f"a {rng.choice(['small', 'large'])} {rng.choice(_COLOURS)} "
            f"{rng.choice(_SHAPES)} {rng.choice(_PLACES)}")
  return [" and ".join(one() for _ in range(rng.randint(1, 2)))
          for _ in range(num)]


@pytest.fixture(scope="module")
def captions():
  return shapes_like_captions(1000)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory, captions):
  prefix = tmp_path_factory.mktemp("spm") / "spiece"
  return text_lib.train_sentencepiece(captions, 96, str(prefix))


@pytest.fixture(scope="module")
def tokenizer(model_path):
  return text_lib.TextTokenizer.load(model_path)


def test_t5_layout(tokenizer, model_path):
  assert model_path.endswith(".model") and os.path.exists(model_path)
  assert os.path.exists(model_path[:-len(".model")] + ".vocab")
  assert tokenizer.vocab_size == 96
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id) == (0, 1, 2)
  assert tokenizer.bos_id == -1
  assert "vocab_size=96" in repr(tokenizer)


def test_round_trip_and_padding(tokenizer, captions):
  batch = captions[:8]
  encoded = tokenizer.encode(batch, max_len=48)
  assert encoded.ids.shape == (8, 48) and encoded.ids.dtype == np.int32
  assert encoded.num_truncated == 0
  for row, length in zip(encoded.ids, encoded.lengths):
    assert row[length - 1] == tokenizer.eos_id
    assert (row[length:] == tokenizer.pad_id).all()
    assert (row[:length - 1] > 2).all()  # No special ids inside the text.
  assert tokenizer.decode(encoded.ids) == batch
  # Unknown characters map to unk (no byte fallback) and decode stops at EOS.
  odd = tokenizer.encode(["a red ☃ circle"], max_len=16)
  assert tokenizer.unk_id in odd.ids[0]
  assert tokenizer.decode(odd.ids)[0].startswith("a red")


def test_unicode_is_nfkc_normalised(tokenizer):
  # Full-width letters are NFKC-equal to ASCII ones.
  full_width = "ａ ｒｅｄ ｃｉｒｃｌｅ"
  plain = tokenizer.encode(["a red circle"], max_len=16).ids
  np.testing.assert_array_equal(
      tokenizer.encode([full_width], max_len=16).ids, plain)


def test_truncation_counted_and_warned(tokenizer, captions, caplog):
  long_text = " and ".join(captions[:10])
  short_text = "a red circle"
  full = tokenizer.count_tokens([long_text, short_text])
  assert full[0] > 10 >= full[1]
  with caplog.at_level(logging.WARNING):
    encoded = tokenizer.encode([long_text, short_text, long_text], max_len=10)
  assert encoded.num_truncated == 2
  np.testing.assert_array_equal(encoded.lengths, [10, full[1] + 1, 10])
  # Truncation keeps the first max_len - 1 tokens plus EOS.
  whole = tokenizer.encode([long_text], max_len=int(full[0]) + 1).ids[0]
  np.testing.assert_array_equal(encoded.ids[0, :9], whole[:9])
  assert encoded.ids[0, 9] == tokenizer.eos_id
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("2 of 3 prompts" in m and "config.text_length" in m
             and "--text_length" in m for m in warnings), warnings
  # Without EOS the row holds the first max_len tokens.
  no_eos = tokenizer.encode([long_text], max_len=10, add_eos=False)
  np.testing.assert_array_equal(no_eos.ids[0], whole[:10])
  assert tokenizer.eos_id not in no_eos.ids[0]


def test_bytes_and_numpy_inputs(tokenizer):
  texts = np.array(["a red circle", "a blue star"], dtype=object)
  from_bytes = tokenizer.encode([t.encode() for t in texts], max_len=12)
  np.testing.assert_array_equal(from_bytes.ids,
                                tokenizer.encode(texts, max_len=12).ids)


@pytest.mark.parametrize("texts, match", [
    (["a red circle", "   "], "Prompt 1 is empty"),
    (["ok", "fine", b"\xff\xfe bad"], "Prompt 2 is not valid UTF-8"),
    (["ok", 3], "Prompt 1 is a int"),
    ("a red circle", "single str"),
])
def test_bad_inputs(tokenizer, texts, match):
  with pytest.raises(ValueError, match=match):
    tokenizer.encode(texts, max_len=8)


def test_bad_lengths_and_ids(tokenizer):
  with pytest.raises(ValueError, match="text_length"):
    tokenizer.encode(["a red circle"], max_len=1)
  with pytest.raises(ValueError, match=r"\[N, L\]"):
    tokenizer.decode(np.array([3, 4, 5]))
  with pytest.raises(ValueError, match="vocab_size"):
    tokenizer.decode(np.array([[3, tokenizer.vocab_size]]))


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_training_is_deterministic(tmp_path, captions, model_type):
  paths = [text_lib.train_sentencepiece(captions, 40, str(tmp_path / name),
                                        model_type=model_type)
           for name in ("a", "b")]
  first, second = (pathlib.Path(p).read_bytes() for p in paths)
  assert first == second
  tokenizer = text_lib.TextTokenizer.load(paths[0])
  assert tokenizer.vocab_size == 40
  assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.unk_id,
          tokenizer.bos_id) == (0, 1, 2, -1)
  encoded = tokenizer.encode(captions[:4], max_len=128)
  assert tokenizer.decode(encoded.ids) == captions[:4]
  other = text_lib.train_sentencepiece(
      shapes_like_captions(1000, seed=1) + ["a pink hexagon"], 40,
      str(tmp_path / "c"), model_type=model_type)
  assert pathlib.Path(other).read_bytes() != first


def test_bpe_learns_whole_words(tokenizer):
  # A closed-vocabulary corpus: every word becomes one piece.
  assert tokenizer.count_tokens(["a small red circle at the top left"])[0] == 8


def test_vocab_size_errors(tmp_path, captions, caplog):
  with pytest.raises(ValueError, match=r"at most \d+ pieces.*--vocab_size"):
    text_lib.train_sentencepiece(captions, 5000, str(tmp_path / "big"),
                                 hard_vocab_limit=True)
  with pytest.raises(ValueError, match=r"need \d+ pieces.*--vocab_size"):
    text_lib.train_sentencepiece(captions, 8, str(tmp_path / "small"))
  with pytest.raises(ValueError, match="empty corpus"):
    text_lib.train_sentencepiece(["", "  "], 32, str(tmp_path / "empty"))
  # Without the hard limit the vocabulary shrinks to what the corpus holds.
  with caplog.at_level(logging.WARNING):
    path = text_lib.train_sentencepiece(captions, 5000, str(tmp_path / "soft"))
  assert 30 < text_lib.TextTokenizer.load(path).vocab_size < 5000
  assert any("config.text_vocab_size" in r.getMessage()
             for r in caplog.records)


def test_default_sentencepiece_layout_and_pickle(tmp_path, captions):
  # A model trained with SentencePiece's own defaults (unk=0, bos=1, eos=2,
  # no pad), as many published .model files are: pad falls back to EOS.
  import sentencepiece as spm
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(captions), model_prefix=str(tmp_path / "plain"),
      vocab_size=40, minloglevel=2)
  tokenizer = text_lib.TextTokenizer.load(tmp_path / "plain.model")
  assert (tokenizer.unk_id, tokenizer.bos_id, tokenizer.eos_id) == (0, 1, 2)
  assert tokenizer.pad_id == tokenizer.eos_id
  encoded = tokenizer.encode(["a red circle"], max_len=12)
  assert tokenizer.decode(encoded.ids) == ["a red circle"]
  clone = pickle.loads(pickle.dumps(tokenizer))
  np.testing.assert_array_equal(clone.encode(["a red circle"], 12).ids,
                                encoded.ids)
  with pytest.raises(ValueError, match="No SentencePiece model"):
    text_lib.TextTokenizer.load(tmp_path / "missing.model")
  (tmp_path / "junk.model").write_bytes(b"not a model")
  with pytest.raises(ValueError, match="not a valid SentencePiece model"):
    text_lib.TextTokenizer.load(tmp_path / "junk.model")


def test_read_prompts_in_parti_format(parti_prompts_tsv):
  """A file written in PartiPrompts.tsv's format (tests/conftest.py): the
  Prompt column whole, quotes, commas and unicode kept, Notes ignored."""
  path, expected, _ = parti_prompts_tsv
  prompts = text_lib.read_prompts(path)
  assert prompts == expected
  assert "Prompt" not in prompts  # the header is not a prompt
  # Quotes are part of the prompt, not TSV quoting.
  assert prompts[2].startswith('"G I G G L E" painted')
  assert 'The words "Fly an airplane" are written' in prompts[3]
  assert "Salvador Dalí" in prompts and max(map(len, prompts)) > 350
  # The same rows under another name, with a BOM and CRLF line ends.
  lines = path.read_text(encoding="utf-8").splitlines()
  other = path.parent / "prompts.txt"  # a tab in line 1 makes it a TSV
  other.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode())
  assert text_lib.read_prompts(other) == expected


@pytest.mark.skipif(not os.path.exists(PARTI_PROMPTS),
                    reason="PartiPrompts.tsv is absent (shared/data beside "
                    "the checkout; allowed in tests/conftest.py)")
def test_read_real_parti_prompts(parti_prompts_tsv):
  prompts = text_lib.read_prompts(PARTI_PROMPTS)
  assert len(prompts) == 1632
  assert prompts[:2] == ["bond", "element"]
  assert all(p and p == p.strip() and "\t" not in p for p in prompts)
  assert any(p.startswith('"G I G G L E"') for p in prompts)
  # The file test_read_prompts_in_parti_format reads has this one's format:
  # its header, and rows (all but the made-up last one) found here.
  with open(PARTI_PROMPTS, encoding="utf-8") as f:
    header, *rows = [tuple(line.rstrip("\n").split("\t")) for line in f]
  written = parti_prompts_tsv.path.read_text(encoding="utf-8").splitlines()
  assert header == tuple(written[0].split("\t"))
  assert set(parti_prompts_tsv.rows[:-1]) <= set(rows)


def test_read_prompts_plain_and_tsv(tmp_path):
  plain = tmp_path / "captions.txt"
  plain.write_text("a red circle\n\n  a blue star  \n\n")
  assert text_lib.read_prompts(plain) == ["a red circle", "a blue star"]
  tsv = tmp_path / "prompts.tsv"
  tsv.write_text("Id\tPrompt\n1\ta cat\n2\t\n3\ta dog\n")
  assert text_lib.read_prompts(tsv) == ["a cat", "a dog"]
  no_column = tmp_path / "bad.tsv"
  no_column.write_text("Id\tCaption\n1\ta cat\n")
  with pytest.raises(ValueError, match="no 'Prompt' column"):
    text_lib.read_prompts(no_column)
  bad_utf8 = tmp_path / "bad.txt"
  bad_utf8.write_bytes(b"fine\n\xff\xfe\n")
  with pytest.raises(ValueError, match="line 2 is not valid UTF-8"):
    text_lib.read_prompts(bad_utf8)
