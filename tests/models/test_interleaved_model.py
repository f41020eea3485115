"""The decoder-only interleaved model: cached = full forward, packed
documents are isolated, PAD is invisible, sizes match their names."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import interleaved as il
from unimm.sampling.sampler import SamplingParams

VOCAB, BOI, SIDE = 40, 3, 2


def _model(**kw):
  args = dict(vocab_size=VOCAB, max_len=32, embed_dim=32, num_heads=4,
              num_kv_heads=1, head_dim=8, mlp_dim=64, num_layers=2,
              boi_id=BOI, image_length=SIDE * SIDE, image_positions="2d",
              qk_norm=True)
  args.update(kw)
  return il.InterleavedLM(**args)


def _doc(rng, n):
  """A document with text, one image span [BOI, 4 codes, EOI], more text."""
  text = list(rng.integers(5, VOCAB, size=n))
  return np.array([1] + text[:n // 2] + [BOI] + list(rng.integers(
      20, VOCAB, size=SIDE * SIDE)) + [4] + text[n // 2:] + [2], np.int32)


@pytest.fixture(scope="module")
def model_and_params():
  model = _model()
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
  return model, params


def test_cached_decoding_equals_full_forward_with_left_padding(
    model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(0)
  docs = [_doc(rng, 6), _doc(rng, 3)]  # lengths 14 and 11
  full = [np.asarray(model.apply(params, d[None]))[0] for d in docs]
  # Left-pad row 1 so both rows end at the same slot; prefill 5 slots, then
  # one token per step.
  length = max(len(d) for d in docs)
  rows = np.stack([np.pad(d, (length - len(d), 0)) for d in docs])
  cache = model.init_cache(2)
  step = jax.jit(lambda p, c, t, s: model.apply(
      p, t, c, s, method=il.InterleavedLM.decode_step))
  prefill = 5
  logits, cache = step(params, cache, jnp.asarray(rows[:, :prefill]), 0)
  got = [logits]
  for s in range(prefill, length):
    logits, cache = step(params, cache, jnp.asarray(rows[:, s:s + 1]), s)
    got.append(logits)
  got = np.stack([np.asarray(g) for g in got], axis=1)  # [2, steps, V]
  for r, d in enumerate(docs):
    pad = length - len(d)
    # got[:, j] are the logits after slot prefill - 1 + j.
    for j in range(got.shape[1]):
      slot = prefill - 1 + j
      if slot >= pad:
        np.testing.assert_allclose(got[r, j], full[r][slot - pad], atol=1e-5,
                                   rtol=1e-5)
  np.testing.assert_array_equal(np.asarray(cache["length"]),
                                [len(d) for d in docs])


def test_pad_tokens_are_invisible_mid_stream(model_and_params):
  model, params = model_and_params
  doc = _doc(np.random.default_rng(1), 4)
  with_pads = np.concatenate([doc[:4], [0, 0, 0], doc[4:]])
  step = jax.jit(lambda p, c, t, s: model.apply(
      p, t, c, s, method=il.InterleavedLM.decode_step))
  plain, cache = step(params, model.init_cache(1), jnp.asarray(doc[None]), 0)
  idled, cache2 = step(params, model.init_cache(1),
                       jnp.asarray(with_pads[None]), 0)
  np.testing.assert_allclose(np.asarray(plain), np.asarray(idled), atol=1e-5)
  assert int(cache2["length"][0]) == len(doc)


def test_packed_documents_do_not_see_each_other(model_and_params):
  model, params = model_and_params
  rng = np.random.default_rng(2)
  a, b = _doc(rng, 4), _doc(rng, 6)
  row = np.concatenate([a, b, [0, 0]])[None]
  segments = np.concatenate([np.full(len(a), 1), np.full(len(b), 2),
                             [0, 0]])[None]
  positions = np.concatenate([np.arange(len(a)), np.arange(len(b)),
                              [0, 0]])[None]
  packed = np.asarray(model.apply(params, jnp.asarray(row),
                                  jnp.asarray(segments),
                                  jnp.asarray(positions)))[0]
  alone_a = np.asarray(model.apply(params, jnp.asarray(a[None])))[0]
  alone_b = np.asarray(model.apply(params, jnp.asarray(b[None])))[0]
  np.testing.assert_allclose(packed[:len(a)], alone_a, atol=1e-5)
  np.testing.assert_allclose(packed[len(a):len(a) + len(b)], alone_b,
                             atol=1e-5)


def test_image_span_index_counts_from_begin_of_image():
  tokens = jnp.asarray([[1, 7, BOI, 20, 21, 22, 23, 4, 9]])
  positions = jnp.arange(9)[None]
  span, last = il.image_span_index(tokens, positions, BOI)
  np.testing.assert_array_equal(np.asarray(span)[0],
                                [-1, -1, -1, 0, 1, 2, 3, 4, 5])
  assert int(last[0]) == 2
  # Continuing in a later chunk keeps counting from the BOI before it.
  span2, _ = il.image_span_index(jnp.asarray([[21]]), jnp.asarray([[4]]),
                                 BOI, last)
  assert int(span2[0, 0]) == 1
  # In a packed row the next document (positions restart) has no span
  # until its own BOI.
  packed = jnp.asarray([[1, BOI, 20, 21, 2, 1, 7, 8, 9, BOI, 30]])
  positions = jnp.asarray([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5]])
  span, _ = il.image_span_index(packed, positions, BOI)
  np.testing.assert_array_equal(np.asarray(span)[0],
                                [-1, -1, 0, 1, 2, -1, -1, -1, -1, -1, 0])


def test_the_2d_table_changes_image_tokens_only(model_and_params):
  model, params = model_and_params
  one_d = _model(image_positions="1d")
  doc = jnp.asarray(_doc(np.random.default_rng(3), 4)[None])
  # Same weights without the row/col tables: text before the image agrees.
  inner = {k: v for k, v in params["params"].items()
           if k not in ("image_rows", "image_cols")}
  a = np.asarray(model.apply(params, doc))[0]
  b = np.asarray(one_d.apply({"params": inner}, doc))[0]
  first_image = int(np.argmax(np.asarray(doc)[0] == BOI)) + 1
  np.testing.assert_allclose(a[:first_image], b[:first_image], atol=1e-5)
  assert np.abs(a[first_image:] - b[first_image:]).max() > 1e-4


@pytest.mark.parametrize("size,low,high", [("1b", 0.8e9, 1.3e9),
                                           ("7b", 6.0e9, 8.0e9)])
def test_size_table(size, low, high):
  model = il.InterleavedLM(vocab_size=65536 + 8192 + 5, max_len=4096,
                           **il.interleaved_config(size))
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                          jnp.ones((1, 8), jnp.int32))
  count = sum(x.size for x in jax.tree.leaves(shapes))
  assert low < count < high, count
  assert model.num_kv_heads == 1  # Multi-query attention, as Gemini.


def test_bad_settings_name_the_field():
  with pytest.raises(ValueError, match="config.model.image_positions"):
    _model(image_positions="3d").init(jax.random.PRNGKey(0),
                                      jnp.ones((1, 4), jnp.int32))
  with pytest.raises(ValueError, match="square image grid"):
    _model(image_length=6).init(jax.random.PRNGKey(0),
                                jnp.ones((1, 4), jnp.int32))


def _naive_continuation(model, params, prompt, image_mask, text_mask, *,
                        eos, eoi, max_text, max_images, cfg_scale=None):
  """The same rules, greedy, with a full forward pass per token; image
  tokens guided by the document with its text removed when cfg_scale; with
  model.end_of_image an image span ends where EOI is likelier than every
  code (at most model.image_length codes, then EOI is forced)."""
  seq, out, images = list(prompt), [], 0
  mode = "image" if prompt[-1] == BOI else "text"

  forward = jax.jit(model.apply)

  def last_logits(tokens):
    # Right padding (PAD) keeps one compiled shape; causal attention never
    # lets the last real token see it.
    row = np.zeros((1, model.max_len), np.int32)
    row[0, :len(tokens)] = tokens
    return np.asarray(forward(params, jnp.asarray(row)))[0, len(tokens) - 1]

  def greedy(mask):
    logits = last_logits(seq)
    if cfg_scale is not None and mode == "image":
      uncond = last_logits([t for t in seq if not text_mask[t]])
      logits = uncond + cfg_scale * (logits - uncond)
    return int(np.argmax(np.where(mask, logits, -np.inf)))

  while True:
    if mode == "image":
      if images >= max_images:
        break
      span_mask = image_mask.copy()
      span_mask[eoi] = model.end_of_image
      for _ in range(model.image_length):
        seq.append(greedy(span_mask))
        out.append(seq[-1])
        if seq[-1] == eoi:
          break
      if seq[-1] != eoi:
        seq.append(eoi)
        out.append(eoi)
      images += 1
    stop = None
    for _ in range(max_text):
      seq.append(greedy(text_mask | np.isin(np.arange(VOCAB), [BOI, eos])))
      out.append(seq[-1])
      if seq[-1] in (BOI, eos):
        stop = seq[-1]
        break
    if stop != BOI:
      break
    mode = "image"
  return out


EOS, EOI = 2, 4
IMAGE_MASK = np.arange(VOCAB) >= 20
TEXT_MASK = (np.arange(VOCAB) >= 5) & ~IMAGE_MASK
# Row 0 opens an image at once; row 1 writes text first.
PROMPTS = [np.array([1, 7, 8, BOI]), np.array([1, 9, 10, 11, 12, 13])]
RULES = dict(eos=EOS, eoi=EOI, max_text=6, max_images=2)


def _continue(model, params, image_sampling, text_sampling=None,
              prompts=PROMPTS):
  """continue_documents on prompts (left-padded) under RULES."""
  width = max(len(p) for p in prompts)
  padded = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
  return il.continue_documents(
      model, params, padded, jax.random.PRNGKey(0), text_ids=TEXT_MASK,
      image_ids=IMAGE_MASK, eos_id=EOS, boi_id=BOI, eoi_id=EOI,
      text_sampling=text_sampling or SamplingParams(temperature=0.0),
      image_sampling=image_sampling, max_new_tokens=60,
      max_text_tokens=RULES["max_text"], max_images=RULES["max_images"])


def _assert_naive(model, params, out, cfg_scale=None, prompts=PROMPTS):
  for row, prompt in zip(out, prompts):
    got = [int(t) for t in row if t != 0]
    assert got == _naive_continuation(model, params, prompt, IMAGE_MASK,
                                       TEXT_MASK, cfg_scale=cfg_scale, **RULES)


def test_continue_documents_follows_the_rules_like_naive_decoding():
  model = _model(max_len=96)
  params = model.init(jax.random.PRNGKey(4), jnp.ones((1, 8), jnp.int32))
  out = _continue(model, params, SamplingParams(temperature=0.0))
  _assert_naive(model, params, out)
  # Row 0 asked for an image: exactly h*w image codes, then EOI.
  row0 = [int(t) for t in out[0] if t != 0]
  assert all(IMAGE_MASK[t] for t in row0[:SIDE * SIDE])
  assert row0[SIDE * SIDE] == EOI


@pytest.mark.parametrize("cfg_scale", [8.0, 1.0])
def test_guided_image_spans_equal_naive_guidance(cfg_scale):
  """CFG: the unconditional half is the document with its text dropped;
  guided greedy decoding equals mixing full-forward logits by hand, and
  scale 1 equals unguided decoding."""
  model = _model(max_len=96)
  params = model.init(jax.random.PRNGKey(5), jnp.ones((1, 8), jnp.int32))
  greedy = SamplingParams(temperature=0.0)
  out = _continue(model, params,
                  SamplingParams(temperature=0.0, cfg_scale=cfg_scale))
  _assert_naive(model, params, out, cfg_scale)
  if cfg_scale == 1.0:
    np.testing.assert_array_equal(out, _continue(model, params, greedy))
  else:  # guidance changes some image token (else the test proves nothing)
    assert not np.array_equal(out, _continue(model, params, greedy))
  with pytest.raises(ValueError, match="image spans only"):
    _continue(model, params, greedy, SamplingParams(cfg_scale=2.0))


def test_sjd_image_spans_equal_greedy_decoding():
  """Speculative Jacobi decoding of guided image spans at temperature 0
  gives the greedy tokens (row 1 idles on PAD through the span; the
  text-dropped half has other positions), and sjd_window belongs to image
  spans only."""
  model = _model(max_len=96)
  params = model.init(jax.random.PRNGKey(5), jnp.ones((1, 8), jnp.int32))
  greedy = SamplingParams(temperature=0.0, cfg_scale=8.0)
  sjd = SamplingParams(temperature=0.0, cfg_scale=8.0, sjd_window=3)
  np.testing.assert_array_equal(_continue(model, params, sjd),
                                _continue(model, params, greedy))
  with pytest.raises(ValueError, match="sjd_window=3: speculative Jacobi "
                     "decoding applies to image spans only"):
    _continue(model, params, greedy, SamplingParams(0.0, sjd_window=3))


# Three prompts open an image at once, one writes text first.
ENDED_PROMPTS = [np.array([1, 7, 8, BOI]), np.array([1, 9, 10, BOI]),
                 np.array([1, 11, 5, 6, BOI]), PROMPTS[1]]


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_variable_length_image_spans_equal_naive_decoding(cfg_scale):
  """end_of_image (LaVIT's dynamic tokens): the image phase stops each row
  at the EOI it writes (a lax.while_loop), a row that stopped idles on PAD
  while the others write codes, a row that wrote all image_length codes
  gets EOI forced, and the text that follows is what full forward passes
  over those spans give, with guidance too."""
  model = _model(max_len=96, image_positions="1d", image_length=6,
                 end_of_image=True)
  params = nn.unbox(model.init(jax.random.PRNGKey(0),
                               jnp.ones((1, 8), jnp.int32)))
  # EOI's embedding scaled so that greedy spans end at different lengths
  # (an untrained model otherwise repeats one code).
  table = params["params"]["embed"]["embedding"]
  params["params"]["embed"]["embedding"] = table.at[EOI].multiply(3.0)
  sampling = SamplingParams(temperature=0.0, cfg_scale=cfg_scale)
  out = _continue(model, params, sampling, prompts=ENDED_PROMPTS)
  _assert_naive(model, params, out, cfg_scale, prompts=ENDED_PROMPTS)
  spans = []  # codes per written span
  for prompt, row in zip(ENDED_PROMPTS, out):
    seq = [BOI] * int(prompt[-1] == BOI) + [int(t) for t in row if t != 0]
    spans += [seq.index(EOI, i) - i - 1 for i, t in enumerate(seq)
              if t == BOI and EOI in seq[i:]]
  # The setting is exercised: an empty span and a full one in one batch.
  assert 0 in spans and 6 in spans, spans
  with pytest.raises(ValueError, match="end at an EOI"):
    _continue(model, params, SamplingParams(temperature=0.0, sjd_window=3))
  with pytest.raises(ValueError, match="end_of_image=True"):
    _model(end_of_image=True).init(jax.random.PRNGKey(0),
                                   jnp.ones((1, 4), jnp.int32))


def test_text_sampling_takes_neither_guidance_nor_cd_k(model_and_params):
  """Guidance and CD-K read the text-dropped document, which only image
  spans have (greedy CD-K through continue_documents equals full forwards:
  tests/inference/test_inference.py)."""
  model, params = model_and_params
  greedy = SamplingParams(temperature=0.0)
  for text_sampling, given in [
      (SamplingParams(contrastive_alpha=0.1), "contrastive_alpha=0.1"),
      (SamplingParams(cfg_scale=2.0), "cfg_scale=2.0")]:
    with pytest.raises(ValueError, match=f"{given}.*guidance and CD-K apply "
                       "to image spans only"):
      il.continue_documents(
          model, params, np.stack([PROMPTS[1]]), jax.random.PRNGKey(0),
          text_ids=TEXT_MASK, image_ids=IMAGE_MASK, eos_id=EOS, boi_id=BOI,
          eoi_id=EOI, text_sampling=text_sampling, image_sampling=greedy,
          max_new_tokens=4)


# Beam search over a small text vocabulary: ids 5, 6, 7 and EOS.
FEW_TEXT = np.isin(np.arange(VOCAB), [5, 6, 7])


def _beam(model, params, beam_size, max_text=3):
  """beam_search_text on PROMPTS (BOI dropped where a prompt ends in it)."""
  prompts = [p[:-1] if p[-1] == BOI else p for p in PROMPTS]
  width = max(len(p) for p in prompts)
  padded = np.stack([np.pad(p, (width - len(p), 0)) for p in prompts])
  return padded, il.beam_search_text(
      model, params, padded, text_ids=FEW_TEXT, eos_id=EOS,
      beam_size=beam_size, max_text_tokens=max_text)


def _exhaustive(model, params, prompt, max_text):
  """Every text of <= max_text tokens from FEW_TEXT + EOS (ending in EOS,
  or cut at max_text) with its log-probability by the logits of the full
  forward pass restricted to those ids, as beam search sees them; likeliest
  first."""
  ids = [5, 6, 7, EOS]
  mask = np.isin(np.arange(VOCAB), ids)
  forward = jax.jit(model.apply)
  found = []
  stack = [[]]
  while stack:
    seq = stack.pop()
    if seq and (seq[-1] == EOS or len(seq) == max_text):
      tokens = np.concatenate([prompt, seq]).astype(np.int32)
      logits = np.asarray(forward(params, jnp.asarray(tokens[None]))[0],
                          np.float64)
      logits = np.where(mask, logits, -np.inf)
      logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
      found.append((sum(logp[len(prompt) + j - 1, t]
                        for j, t in enumerate(seq)), seq))
      continue
    stack += [seq + [t] for t in ids]
  return sorted(found, key=lambda f: -f[0])


def test_beam_search_finds_the_likeliest_texts():
  """Beams as wide as every 2-token prefix (4^2 = 16) make a 3-token search
  exact: its 16 final beams are the exhaustive top 16, in order, with their
  log-probabilities."""
  model = _model(max_len=32)
  # A model whose greedy continuations are not the likeliest (both rows).
  params = model.init(jax.random.PRNGKey(13), jnp.ones((1, 8), jnp.int32))
  padded, (out, scores) = _beam(model, params, beam_size=16)
  _, (_, greedy_scores) = _beam(model, params, beam_size=1)
  assert out.shape[:2] == scores.shape == (len(padded), 16)
  assert np.all(scores[:, 0] > greedy_scores[:, 0] + 1e-3)
  for r, row in enumerate(padded):
    prompt = row[row != 0]
    top = _exhaustive(model, params, prompt, max_text=3)[:16]
    assert [[int(t) for t in beam if t != 0] for beam in out[r]] == [
        seq for _, seq in top]
    np.testing.assert_allclose(scores[r], [lp for lp, _ in top], rtol=1e-4,
                               atol=1e-4)


def test_sequence_logprob_is_the_teacher_forced_sum_per_document(
    model_and_params):
  """Rows of different lengths, right-padded, score as each alone does:
  the sum over the masked tokens of log-softmax(full forward)."""
  model, params = model_and_params
  rng = np.random.default_rng(5)
  docs = [_doc(rng, 6), _doc(rng, 2)]
  # Score the image codes of the first document, the text after the image
  # of the second.
  masks = [np.arange(len(docs[0])) > np.argmax(docs[0] == BOI),
           np.arange(len(docs[1])) > np.argmax(docs[1] == 4)]
  masks[0][np.argmax(docs[0] == 4):] = False
  width = max(len(d) for d in docs)
  got = il.sequence_logprob(
      model, params, np.stack([np.pad(d, (0, width - len(d))) for d in docs]),
      np.stack([np.pad(m, (0, width - len(m))) for m in masks]))
  for d, m, value in zip(docs, masks, got):
    logits = np.asarray(model.apply(params, d[None])[0], np.float64)
    logp = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
    expected = sum(logp[t - 1, d[t]] for t in np.flatnonzero(m))
    np.testing.assert_allclose(value, expected, rtol=1e-5)
  with pytest.raises(ValueError, match="config.model.max_len"):
    il.sequence_logprob(model, params, np.ones((1, 40), np.int32),
                        np.ones((1, 40), bool))


def test_one_beam_is_greedy_and_more_beams_score_higher():
  model = _model(max_len=48)
  params = model.init(jax.random.PRNGKey(7), jnp.ones((1, 8), jnp.int32))
  padded, (one, one_scores) = _beam(model, params, beam_size=1, max_text=8)
  forward = jax.jit(model.apply)
  mask = FEW_TEXT | (np.arange(VOCAB) == EOS)
  for r, row in enumerate(padded):
    seq = list(row[row != 0])
    prompt_length = len(seq)
    while len(seq) - prompt_length < 8 and seq[-1] != EOS:
      logits = np.asarray(forward(params, jnp.asarray([seq])))[0, -1]
      seq.append(int(np.argmax(np.where(mask, logits, -np.inf))))
    assert [int(t) for t in one[r, 0] if t != 0] == seq[prompt_length:]
  _, (_, scores) = _beam(model, params, beam_size=4, max_text=8)
  assert np.all(scores[:, 0] >= one_scores[:, 0] - 1e-5)
  assert np.all(np.diff(scores, axis=1) <= 0)  # best first
  with pytest.raises(ValueError, match="beam_size"):
    _beam(model, params, beam_size=0)
