"""Image-input settings of the interleaved model (Fuyu patches, resampler
queries): the cached sampler equals the full forward, a document's logits
do not depend on padding or on the other documents of a packed row, and
"patches" reads 32- and 64-pixel images in one batch."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import image_input as image_input_lib
from unimm.models import interleaved as il
from unimm.models import vocab as vocab_lib

LAYOUT = vocab_lib.VocabLayout(text_vocab_size=15, image_vocab_size=20,
                               read_ids=True)
FEATURES, FEATURE_DIM = 4, 6  # "resampler": encoder features per image


def _model(kind):
  return il.InterleavedLM(
      vocab_size=LAYOUT.size, max_len=160, embed_dim=32, num_heads=4,
      num_kv_heads=1, head_dim=8, mlp_dim=64, num_layers=2, boi_id=3,
      image_length=4, image_input=kind, read_id=LAYOUT.read_id,
      newline_id=LAYOUT.newline_id, num_queries=3, feature_length=FEATURES,
      num_experts=2 if kind == "resampler" else 1, resampler_layers=1)


def _document(kind, rng, image_size=8):
  """[BOS, read span, text, BOI, 4 codes, EOI, EOS] and its reads."""
  if kind == "patches":
    image = rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8)
    setting = image_input_lib.ImageInput("patches", patch_size=4)
    tokens, reads = vocab_lib.encode_documents_and_reads(
        [[image, "x"]], LAYOUT,
        lambda texts: [rng.integers(0, 15, 3) for _ in texts],
        lambda images: rng.integers(0, 20, (len(images), 2, 2)),
        image_input=setting)
    tokens, reads = tokens[0], reads[0]
  else:
    tokens = np.concatenate([[1], LAYOUT.read_span(1, 3, newline=False),
                             rng.integers(5, 20, 3)], dtype=np.int32)
    reads = rng.normal(size=(FEATURES, FEATURE_DIM)).astype(np.float32)
  codes = LAYOUT.image_span(rng.integers(0, 20, (2, 2)))
  return np.concatenate([tokens[:-1], codes, [2]]).astype(np.int32), reads


def _pad_reads(reads, length):
  return np.pad(reads, ((0, length - len(reads)), (0, 0)))


@pytest.fixture(scope="module", params=["patches", "resampler"])
def setup(request):
  kind = request.param
  model = _model(kind)
  rng = np.random.default_rng(0)
  tokens, reads = _document(kind, rng)
  params = model.init(jax.random.PRNGKey(0), jnp.asarray(tokens[None]),
                      reads=jnp.asarray(reads[None]))
  return kind, model, params


def test_reads_fill_the_read_slots_and_change_what_follows(setup):
  kind, model, params = setup
  tokens, reads = _document(kind, np.random.default_rng(1))
  forward = jax.jit(lambda r: model.apply(params, tokens[None], reads=r))
  a = np.asarray(forward(jnp.asarray(reads[None])))[0]
  b = np.asarray(forward(jnp.asarray(reads[None] + 1.0)))[0]
  first_read = int(np.argmax(tokens == LAYOUT.read_id))
  # Before the first READ slot nothing differs; after it everything may.
  np.testing.assert_allclose(a[:first_read], b[:first_read], atol=1e-6)
  assert np.abs(a[-1] - b[-1]).max() > 1e-4


def test_cached_decoding_equals_full_forward_with_left_padding(setup):
  kind, model, params = setup
  rng = np.random.default_rng(2)
  docs = [_document(kind, rng) for _ in range(2)]
  docs[1] = (docs[1][0][:-3], docs[1][1])  # a shorter second row
  reads = np.stack([d[1] for d in docs])
  full = [np.asarray(model.apply(params, d[None], reads=r[None]))[0]
          for d, r in docs]
  length = max(len(d) for d, _ in docs)
  rows = np.stack([np.pad(d, (length - len(d), 0)) for d, _ in docs])
  # The prefill holds every READ slot; then one token per step.
  prefill = int(np.argmax(rows == 4, axis=1).max()) + 1  # past each EOI
  step = jax.jit(lambda p, c, t, s, r: model.apply(
      p, t, c, s, r, method=il.InterleavedLM.decode_step))
  logits, cache = step(params, model.init_cache(2), rows[:, :prefill], 0,
                       reads)
  got = [np.asarray(logits)]
  for s in range(prefill, length):
    logits, cache = step(params, cache, rows[:, s:s + 1], s, None)
    got.append(np.asarray(logits))
  for r, (d, _) in enumerate(docs):
    pad = length - len(d)
    for j, logits in enumerate(got):
      slot = prefill - 1 + j
      if slot >= pad:
        np.testing.assert_allclose(logits[r], full[r][slot - pad],
                                   atol=2e-5, rtol=2e-5)


def test_packed_documents_and_padded_reads_do_not_matter(setup):
  kind, model, params = setup
  rng = np.random.default_rng(3)
  (a, ra), (b, rb) = _document(kind, rng), _document(kind, rng)
  alone = np.asarray(model.apply(params, b[None], reads=rb[None]))[0]
  row = np.concatenate([a, b, np.zeros(5, np.int32)])
  segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2),
                             np.zeros(5)]).astype(np.int32)
  positions = np.concatenate([np.arange(len(a)), np.arange(len(b)),
                              np.zeros(5)]).astype(np.int32)
  # The row's reads in document order, then padding reads of garbage.
  garbage = np.full((3 * FEATURES,) + ra.shape[1:], 7, ra.dtype)
  reads = np.concatenate([ra, rb, garbage])
  packed = np.asarray(model.apply(params, row[None], segments[None],
                                  positions[None], reads=reads[None]))[0]
  np.testing.assert_allclose(packed[len(a):len(a) + len(b)], alone,
                             atol=2e-5, rtol=2e-5)


def test_patches_read_32_and_64_pixel_images_in_one_batch():
  model = _model("patches")
  rng = np.random.default_rng(4)
  docs = [_document("patches", rng, image_size=s) for s in (32, 64)]
  params = model.init(jax.random.PRNGKey(1), docs[0][0][None],
                      reads=docs[0][1][None])
  assert [len(r) for _, r in docs] == [64, 256]
  assert [int((d == LAYOUT.newline_id).sum()) for d, _ in docs] == [8, 16]
  forward = jax.jit(lambda t, r: model.apply(params, t, reads=r))
  alone = [np.asarray(forward(d[None], r[None]))[0] for d, r in docs]
  length = max(len(d) for d, _ in docs)
  tokens = np.stack([np.pad(d, (0, length - len(d))) for d, _ in docs])
  reads = np.stack([_pad_reads(r, 256) for _, r in docs])
  batch = np.asarray(forward(tokens, reads))
  for r, (d, _) in enumerate(docs):
    np.testing.assert_allclose(batch[r, :len(d)], alone[r], atol=2e-5,
                               rtol=2e-5)


def test_bad_settings_and_images_are_clear_errors():
  with pytest.raises(ValueError, match="image_input='pixels'"):
    image_input_lib.ImageInput("pixels")
  with pytest.raises(ValueError, match="multiples of patch_size=4.*30x32"):
    image_input_lib.ImageInput("patches", 4).check_image((30, 32, 3))
  with pytest.raises(ValueError, match="no READ ids"):
    vocab_lib.encode_documents_and_reads(
        [[np.zeros((8, 8, 3), np.uint8)]],
        vocab_lib.VocabLayout(15, 20), lambda t: [], lambda i: i,
        image_input=image_input_lib.ImageInput("patches"))
  model = il.InterleavedLM(
      vocab_size=LAYOUT.size, max_len=16, embed_dim=32, num_heads=4,
      num_kv_heads=1, head_dim=8, mlp_dim=64, num_layers=1,
      image_input="patches")
  with pytest.raises(ValueError, match="read_id and newline_id"):
    model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def test_segments_name_a_read_span():
  tokens, _ = _document("patches", np.random.default_rng(5))
  kinds = [kind for kind, _ in LAYOUT.segments(tokens)]
  assert kinds == ["read", "text", "image"]
