"""The joint vocabulary: specials, text block, image block; conversions
round-trip, blocks partition the ids, bad ids name the range."""
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import vocab
from unimm.models.vocab import VocabLayout

TEXT, CODES = 64, 512


@pytest.fixture
def layout():
  return VocabLayout(text_vocab_size=TEXT, image_vocab_size=CODES)


def test_layout_sizes_and_specials(layout):
  assert (vocab.PAD, vocab.BOS, vocab.EOS, vocab.BOI, vocab.EOI) == (
      0, 1, 2, 3, 4)
  assert (layout.PAD, layout.BOI, layout.EOI) == (0, 3, 4)
  assert layout.size == 5 + TEXT + CODES
  assert layout.text_offset == 5 and layout.image_offset == 5 + TEXT
  assert layout.text_to_joint([0, 7]).tolist() == [5, 12]
  assert layout.image_to_joint([0, 3]).tolist() == [5 + TEXT, 8 + TEXT]


def test_round_trips_keep_shape_and_dtype(layout):
  rng = np.random.default_rng(0)
  text = rng.integers(0, TEXT, size=(3, 7))
  joint = layout.text_to_joint(text)
  assert joint.shape == (3, 7) and joint.dtype == np.int32
  np.testing.assert_array_equal(layout.joint_to_text(joint), text)
  codes = rng.integers(0, CODES, size=(2, 8, 8))
  joint = layout.image_to_joint(codes)
  assert joint.shape == (2, 8, 8) and joint.dtype == np.int32
  np.testing.assert_array_equal(layout.joint_to_image(joint), codes)
  # Edges of both blocks.
  assert layout.joint_to_text(layout.text_to_joint([0, TEXT - 1])).tolist() \
      == [0, TEXT - 1]
  assert layout.joint_to_image(
      layout.image_to_joint([0, CODES - 1])).tolist() == [0, CODES - 1]


def test_blocks_partition_the_vocabulary(layout):
  ids = np.arange(layout.size)
  text, image = layout.is_text(ids), layout.is_image(ids)
  assert not (text & image).any()
  assert text.sum() == TEXT and image.sum() == CODES
  np.testing.assert_array_equal(~(text | image), ids < 5)
  # Works on jax arrays (allowed-token masks in the sampler).
  np.testing.assert_array_equal(np.asarray(layout.is_image(jnp.asarray(ids))),
                                image)
  assert layout.is_text([5, 4]).tolist() == [True, False]


def test_image_span(layout):
  codes = np.arange(12).reshape(3, 4) * 40  # [h, w]
  span = layout.image_span(codes)
  assert span.dtype == np.int32 and span.shape == (3 * 4 + 2,)
  assert span[0] == vocab.BOI and span[-1] == vocab.EOI
  assert layout.is_image(span[1:-1]).all()
  np.testing.assert_array_equal(
      layout.joint_to_image(span[1:-1]).reshape(3, 4), codes)  # row-major


def test_segments_split_a_document(layout):
  text_a, text_b = np.array([3, 9, 0]), np.array([63])
  codes = np.arange(4).reshape(2, 2) + 500
  doc = np.concatenate([[vocab.BOS], layout.text_to_joint(text_a),
                        layout.image_span(codes), layout.text_to_joint(text_b),
                        layout.image_span(codes[::-1]), [vocab.EOS],
                        [vocab.PAD, vocab.PAD]])
  runs = layout.segments(doc)
  assert [kind for kind, _ in runs] == ["text", "image", "text", "image"]
  np.testing.assert_array_equal(runs[0][1], text_a)
  np.testing.assert_array_equal(runs[1][1], codes.reshape(-1))
  np.testing.assert_array_equal(runs[2][1], text_b)
  np.testing.assert_array_equal(runs[3][1], codes[::-1].reshape(-1))


@pytest.mark.parametrize("stream, match", [
    ([1, 5 + TEXT, 2], "outside an image span"),
    ([1, 3, 5 + TEXT, 6, 4, 2], "inside an image span"),
    ([1, 3, 5 + TEXT, 3, 4, 2], "inside an image span"),
    ([1, 6, 4, 2], "closes no image span"),
    ([1, 3, 5 + TEXT, 2], "inside an image span"),
    ([1, 3, 5 + TEXT], "never closed"),
    ([1, 5 + TEXT + CODES], r"\[0, 581\)"),
])
def test_malformed_streams_raise(layout, stream, match):
  with pytest.raises(ValueError, match=match):
    layout.segments(stream)


def test_out_of_range_ids_name_the_range(layout):
  with pytest.raises(ValueError, match=r"\[0, 64\).*text_vocab_size=64"):
    layout.text_to_joint([0, TEXT])
  with pytest.raises(ValueError, match=r"\[0, 64\)"):
    layout.text_to_joint([-1])
  with pytest.raises(ValueError, match=r"\[0, 512\).*num_codes"):
    layout.image_to_joint([CODES])
  with pytest.raises(ValueError, match=r"\[5, 69\)"):
    layout.joint_to_text([vocab.BOI])
  with pytest.raises(ValueError, match=r"\[5, 69\)"):
    layout.joint_to_text([5 + TEXT])  # an image id
  with pytest.raises(ValueError, match=r"\[69, 581\)"):
    layout.joint_to_image([5 + TEXT - 1])  # a text id
  with pytest.raises(ValueError, match=r"\[69, 581\)"):
    layout.joint_to_image([layout.size])
  with pytest.raises(ValueError, match="integers"):
    layout.text_to_joint([1.5])
  with pytest.raises(ValueError, match=r"\[h, w\]"):
    layout.image_span(np.zeros(4, np.int32))
  with pytest.raises(ValueError, match="text_vocab_size=0"):
    VocabLayout(0, CODES)
  with pytest.raises(ValueError, match="num_codes"):
    VocabLayout(TEXT, -3)


def test_read_and_location_ids_follow_the_codes():
  layout = VocabLayout(text_vocab_size=10, image_vocab_size=20, read_ids=True,
                       location_bins=4)
  assert (layout.read_id, layout.newline_id) == (35, 36)
  assert layout.location_offset == 37 and layout.size == 37 + 16
  ids = np.arange(layout.size)
  # Every id is exactly one of: special, text, code, READ/NEWLINE, location.
  blocks = (ids < vocab.NUM_SPECIALS, layout.is_text(ids),
            layout.is_image(ids), layout.is_read(ids), layout.is_location(ids))
  np.testing.assert_array_equal(np.sum(blocks, axis=0), np.ones(layout.size))
  np.testing.assert_array_equal(layout.location_to_joint([0, 15]), [37, 52])
  with pytest.raises(ValueError, match="location_bins=4"):
    layout.location_to_joint([16])
  doc = np.concatenate([[vocab.BOS], layout.read_span(1, 2, newline=True),
                        layout.text_to_joint([3]),
                        layout.location_to_joint([5, 10]), [vocab.EOS]])
  kinds = [(kind, list(run)) for kind, run in layout.segments(doc)]
  assert kinds[0][0] == "read" and kinds[1:] == [("text", [3]),
                                                   ("location", [5, 10])]


def test_boxes_encode_as_two_location_ids():
  from unimm.data import grounding  # pylint: disable=g-import-not-at-top
  layout = VocabLayout(10, 20, location_bins=16)
  box = grounding.BoxTokens(17, 52, 16)
  tokens = vocab.encode_documents(
      [["where", box]], layout, lambda texts: [np.array([1]) for _ in texts],
      lambda images: images)[0]
  np.testing.assert_array_equal(
      tokens, [vocab.BOS, layout.text_to_joint([1])[0],
               layout.location_offset + 17, layout.location_offset + 52,
               vocab.EOS])
  with pytest.raises(ValueError, match="location_bins=4"):
    vocab.encode_documents([[box]], VocabLayout(10, 20, location_bins=4),
                           lambda t: [], lambda i: i)
