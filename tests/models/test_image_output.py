"""Continuous image output. Emu's (image_output="embeddings"), with an l2
head and with GIVT's mixture head: the cached regression equals the full
forward, generation feeds each regressed embedding back as a naive loop
of full forwards does, guidance 1 is unguided, the mixture's density and
draws are right, the frozen table stays frozen. NExT-GPT / SEED-X output
queries ("queries"): a written span reads only its queries, and its one
cached call gives the full forward's (guided) projections. Bad settings
are clear errors."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm.models import interleaved as il
from unimm.sampling.sampler import SamplingParams
from unimm.train import optim

VOCAB, BOI, EOS, EOI, SIDE, OFFSET, CODES, WIDTH = 40, 3, 2, 4, 2, 20, 20, 6
TEXT_MASK = (np.arange(VOCAB) >= 5) & (np.arange(VOCAB) < OFFSET)
IMAGE_MASK = np.arange(VOCAB) >= OFFSET


def _model(**kw):
  args = dict(vocab_size=VOCAB, max_len=64, embed_dim=32, num_heads=4,
              num_kv_heads=1, head_dim=8, mlp_dim=64, num_layers=2,
              boi_id=BOI, image_length=SIDE * SIDE, image_positions="2d",
              qk_norm=True, image_output="embeddings", embedding_dim=WIDTH,
              image_offset=OFFSET, image_codes=CODES)
  args.update(kw)
  return il.InterleavedLM(**args)


@pytest.fixture(scope="module", params=["l2", "gmm"])
def model_and_params(request):
  model = _model(image_head=request.param,
                 mixtures=3 if request.param == "gmm" else 1)
  params = nn.unbox(model.init(jax.random.PRNGKey(0),
                               jnp.ones((1, 8), jnp.int32)))
  return model, params


def _doc(rng):
  """[BOS, text, BOI, 4 codes, EOI, text, EOS]."""
  return np.array([1, 7, 8, 9, BOI] + list(rng.integers(
      OFFSET, VOCAB, size=SIDE * SIDE)) + [EOI, 10, 11, EOS], np.int32)


def test_cached_regression_equals_the_full_forward(model_and_params):
  model, params = model_and_params
  doc = _doc(np.random.default_rng(0))
  logits, regressed = model.apply(params, doc[None], regress=True)
  # Code slots fed as given embeddings (their table rows) step by step.
  given = np.asarray(model.apply(params, jnp.asarray(doc[None]),
                                 method=il.InterleavedLM.code_embeddings))
  cache = model.init_cache(1)
  step = jax.jit(lambda p, c, t, e, s: model.apply(
      p, t, e, c, s, method=il.InterleavedLM.decode_regress))
  prefill = 3
  got_logits, got, cache = step(params, cache, doc[None, :prefill],
                                given[:, :prefill], 0)
  got_logits, got = [got_logits], [got]
  for s in range(prefill, len(doc)):
    lg, rg, cache = step(params, cache, doc[None, s:s + 1],
                         given[:, s:s + 1], s)
    got_logits.append(lg)
    got.append(rg)
  np.testing.assert_allclose(np.concatenate(got), regressed[0, prefill - 1:],
                             atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(np.concatenate(got_logits),
                             logits[0, prefill - 1:], atol=1e-5, rtol=1e-5)
  # The codes' embeddings are what code slots read: another table changes
  # the output after the first code, not before.
  other = jax.tree.map(lambda x: x, params)
  other["params"]["frozen_image_table"] = params["params"][
      "frozen_image_table"] * 2.0
  moved = model.apply(other, doc[None], regress=True)[1]
  boi = list(doc).index(BOI)
  np.testing.assert_allclose(moved[0, :boi + 1], regressed[0, :boi + 1],
                             atol=1e-6)
  assert not np.allclose(moved[0, boi + 1:], regressed[0, boi + 1:])


PROMPTS = [np.array([1, 7, 8, BOI]), np.array([1, 9, 10, 11, 12, 13])]


def _continue(model, params, cfg_scale=None, text_ids=TEXT_MASK, **kw):
  width = max(len(p) for p in PROMPTS)
  padded = np.stack([np.pad(p, (width - len(p), 0)) for p in PROMPTS])
  return il.continue_documents(
      model, params, padded, jax.random.PRNGKey(0), text_ids=text_ids,
      image_ids=IMAGE_MASK, eos_id=EOS, boi_id=BOI, eoi_id=EOI,
      text_sampling=SamplingParams(temperature=0.0),
      image_sampling=SamplingParams(temperature=0.0, cfg_scale=cfg_scale),
      max_new_tokens=30, max_text_tokens=6, max_images=2,
      return_embeddings=True, **kw)


def _naive_image(model, params, prompt, cfg_scale=None):
  """The image span after `prompt` (ending in BOI) by full forwards: each
  regressed embedding is fed back at the next code slot; guidance mixes
  the regression of the document with its text dropped."""
  forward = jax.jit(lambda p, t, e: model.apply(p, t, regress=True,
                                                embeddings=e)[1])
  k = model.mixtures
  seq, fed, out = list(prompt), [np.zeros(WIDTH)] * len(prompt), []
  for _ in range(SIDE * SIDE):
    def last(keep):
      tokens = np.array([t for t, k in zip(seq, keep) if k])[None]
      given = np.stack([e for e, k in zip(fed, keep) if k])[None]
      return np.asarray(forward(params, tokens, given))[0, -1]
    cond = last([True] * len(seq))
    guided = cond
    if cfg_scale is not None:
      uncond = last([not TEXT_MASK[t] for t in seq])
      guided = uncond + cfg_scale * (cond - uncond)
    if model.image_head == "gmm":  # greedy: the (guided) likeliest mean
      _, means, _ = il.split_mixture(cond, k)
      cond = np.asarray(means)[int(np.argmax(guided[:k]))]
    else:
      cond = guided
    out.append(cond)
    seq.append(OFFSET)
    fed.append(cond)
  return np.stack(out)


def test_generation_feeds_back_what_it_regressed(model_and_params):
  model, params = model_and_params
  cfg_scale = 3.0  # guided (test_guidance_one_is_unguided: 1 = none)
  out, embeddings = _continue(model, params, cfg_scale)
  # Row 0 opens with an image: exactly h*w codes (the nearest table rows
  # of its embeddings), then EOI.
  row0 = [int(t) for t in out[0] if t != 0]
  assert all(IMAGE_MASK[t] for t in row0[:SIDE * SIDE])
  assert row0[SIDE * SIDE] == EOI
  np.testing.assert_allclose(
      embeddings[0][0], _naive_image(model, params, PROMPTS[0], cfg_scale),
      atol=1e-4, rtol=1e-4)
  nearest = model.apply(params, jnp.asarray(embeddings[0][0]),
                        method=il.InterleavedLM.nearest_codes)
  np.testing.assert_array_equal(row0[:SIDE * SIDE], nearest)
  # Row 1 writes text first: it drew nothing in the first image phase.
  assert not np.any(embeddings[0][1])


def test_the_mixture_scores_and_samples_its_density():
  """mixture_nll is the mixture's density (by hand); draws at temperature
  1 pick components by their weights and spread by their scales."""
  k, e = 3, 2
  centres = np.array([[0.0, 0.0], [6.0, 0.0], [0.0, 6.0]])  # well apart
  raw_scales = np.log(np.expm1(np.array([[0.5, 0.3], [0.4, 0.6],
                                         [0.2, 0.5]])))  # softplus^-1
  raw = np.concatenate([[0.5, -0.3, 0.1], np.stack(
      [centres, raw_scales], axis=1).reshape(-1)]).astype(np.float32)
  logits, means, scales = (np.asarray(a, np.float64)
                           for a in il.split_mixture(jnp.asarray(raw), k))
  np.testing.assert_allclose(means, centres)
  x = np.array([0.3, 5.2])
  weights = np.exp(logits - logits.max())
  weights /= weights.sum()
  density = sum(w * np.prod(np.exp(-0.5 * ((x - m) / s) ** 2)
                            / (s * np.sqrt(2 * np.pi)))
                for w, m, s in zip(weights, means, scales))
  np.testing.assert_allclose(
      float(il.mixture_nll(jnp.asarray(raw), jnp.asarray(x, jnp.float32), k)),
      -np.log(density) / e, rtol=1e-4)
  n = 20000
  draws = np.asarray(il.sample_mixture(
      jax.random.PRNGKey(0), jnp.tile(jnp.asarray(raw), (n, 1)), k, 1.0))
  # Components well apart: the nearest mean is the drawn component.
  nearest = np.argmin((((draws[:, None] - means[None]) / scales[None]) ** 2
                       ).sum(-1), axis=1)
  np.testing.assert_allclose(np.bincount(nearest, minlength=k) / n, weights,
                             atol=0.02)
  for c in range(k):
    np.testing.assert_allclose(draws[nearest == c].std(0), scales[c],
                               rtol=0.1)
  greedy = np.asarray(il.sample_mixture(jax.random.PRNGKey(0),
                                        jnp.asarray(raw)[None], k, 0.0))[0]
  np.testing.assert_allclose(greedy, means[np.argmax(logits)], rtol=1e-6)


def test_guidance_one_is_unguided(model_and_params):
  model, params = model_and_params
  plain = _continue(model, params, None)
  one = _continue(model, params, 1.0)
  np.testing.assert_array_equal(plain[0], one[0])
  np.testing.assert_allclose(one[1][0], plain[1][0], atol=1e-5)
  guided = _continue(model, params, 3.0)
  assert not np.allclose(guided[1][0], plain[1][0])


def _init(model):
  return model.init(jax.random.PRNGKey(0), jnp.ones((1, 4), jnp.int32))


def _l2_model():
  model = _model()
  return model, nn.unbox(model.init(jax.random.PRNGKey(0),
                                    jnp.ones((1, 8), jnp.int32)))


def test_the_table_stays_frozen_under_both_optimizers():
  model, params = _l2_model()
  batch = jnp.asarray(np.stack([_doc(np.random.default_rng(i))
                                for i in range(2)]))
  names = jax.tree.map(lambda _: jax.sharding.PartitionSpec(),
                       params["params"])
  # Muon needs one hidden matrix named as such: give it the MLP's.
  names = jax.tree_util.tree_map_with_path(
      lambda path, spec: jax.sharding.PartitionSpec("embed", "mlp")
      if "wi" in str(path) and "kernel" in str(path) else spec, names)

  def loss(p):
    _, regressed = model.apply({"params": p}, batch, regress=True)
    return jnp.mean(jnp.square(regressed))

  for name in ("adamw", "muon"):
    tx = optim.make_optimizer(dict(name=name, lr=0.1, weight_decay=0.5,
                                   warmup_steps=0), 10, names)
    p = params["params"]
    state = tx.init(p)

    @jax.jit
    def step(p, state, tx=tx):
      updates, state = tx.update(jax.grad(loss)(p), state, p)
      return optax.apply_updates(p, updates), state

    for _ in range(3):
      p, state = step(p, state)
    np.testing.assert_array_equal(p["frozen_image_table"],
                                  params["params"]["frozen_image_table"])
    assert not np.allclose(p["image_out"]["kernel"],
                           params["params"]["image_out"]["kernel"])


def test_bad_settings_are_clear_errors():
  with pytest.raises(ValueError, match="image_output='pixels'"):
    _init(_model(image_output="pixels"))
  with pytest.raises(ValueError, match="embedding_dim > 0"):
    _init(_model(embedding_dim=0))
  with pytest.raises(ValueError, match="image_codes=30"):
    _init(_model(image_codes=30))
  with pytest.raises(ValueError, match="image_head='normal'"):
    _init(_model(image_head="normal"))
  model, params = _l2_model()
  for bad in (dict(contrastive_alpha=0.1), dict(sjd_window=3)):
    with pytest.raises(ValueError, match="regresses image embeddings"):
      il.continue_documents(
          model, params, np.array([[1, 7, BOI]]), jax.random.PRNGKey(0),
          text_ids=TEXT_MASK, image_ids=IMAGE_MASK, eos_id=EOS, boi_id=BOI,
          eoi_id=EOI, text_sampling=SamplingParams(temperature=0.0),
          image_sampling=SamplingParams(temperature=1.0, **bad),
          max_new_tokens=8)
  codes_model = _model(image_output="codes")
  with pytest.raises(ValueError, match="return_embeddings needs"):
    il.continue_documents(
        codes_model, _init(codes_model),
        np.array([[1, 7, BOI]]), jax.random.PRNGKey(0),
        text_ids=TEXT_MASK, image_ids=IMAGE_MASK, eos_id=EOS, boi_id=BOI,
        eoi_id=EOI, text_sampling=SamplingParams(temperature=0.0),
        image_sampling=SamplingParams(temperature=0.0), max_new_tokens=8,
        return_embeddings=True)


# Output queries read images through a reading setting: READ and NEWLINE
# take two ids below the codes (not text the sampler may write).
READ, NEWLINE = OFFSET - 2, OFFSET - 1
QUERY_TEXT = TEXT_MASK & (np.arange(VOCAB) < READ)


@pytest.fixture(scope="module")
def queries_model():
  model = _model(image_output="queries", image_input="patches", patch_size=2,
                 read_id=READ, newline_id=NEWLINE)
  return model, nn.unbox(_init(model))


def test_written_spans_read_their_queries_not_their_codes(queries_model):
  model, params = queries_model
  rng = np.random.default_rng(0)
  doc, other = _doc(rng), _doc(rng)
  other[:5] = doc[:5]  # the same text, other codes
  logits, projected = model.apply(params, doc[None], regress=True)
  logits2, projected2 = model.apply(params, other[None], regress=True)
  # Nothing the model computes sees a written span's codes (its targets).
  np.testing.assert_allclose(logits2, logits, atol=1e-6)
  np.testing.assert_allclose(projected2, projected, atol=1e-6)
  # Its text does.
  other[2] = 11
  assert not np.allclose(model.apply(params, other[None], regress=True)[1],
                         projected, atol=1e-4)


def test_an_image_of_output_queries_is_one_call_of_the_full_forward(
    queries_model):
  model, params = queries_model
  cfg_scale = 3.0
  out, steps, embeddings = _continue(model, params, cfg_scale,
                                     text_ids=QUERY_TEXT,
                                     return_image_steps=True)
  assert steps[0] == 1  # the whole span in one model call
  forward = jax.jit(lambda t: model.apply(params, t, regress=True)[1])
  span = list(PROMPTS[0]) + [OFFSET] * (SIDE * SIDE)
  dropped = [t for t in span if not QUERY_TEXT[t]]
  cond = np.asarray(forward(np.array([span])))[0, -SIDE * SIDE:]
  uncond = np.asarray(forward(np.array([dropped])))[0, -SIDE * SIDE:]
  np.testing.assert_allclose(embeddings[0][0],
                             uncond + cfg_scale * (cond - uncond),
                             atol=1e-4, rtol=1e-4)
  row0 = [int(t) for t in out[0] if t != 0]
  nearest = model.apply(params, jnp.asarray(embeddings[0][0]),
                        method=il.InterleavedLM.nearest_codes)
  np.testing.assert_array_equal(row0[:SIDE * SIDE], nearest)
  assert row0[SIDE * SIDE] == EOI
  # Guidance 1 is none.
  plain = _continue(model, params, None, text_ids=QUERY_TEXT)
  one = _continue(model, params, 1.0, text_ids=QUERY_TEXT)
  np.testing.assert_array_equal(plain[0], one[0])
  np.testing.assert_allclose(one[1][0], plain[1][0], atol=1e-5)
  np.testing.assert_allclose(plain[1][0][0], cond, atol=1e-4, rtol=1e-4)


def test_output_queries_need_a_reading_setting_and_an_l2_head():
  with pytest.raises(ValueError, match="image_input='codes'"):
    _init(_model(image_output="queries"))
  with pytest.raises(ValueError, match="image_head='gmm'"):
    _init(_model(image_output="queries", image_input="patches",
                 read_id=READ, newline_id=NEWLINE, image_head="gmm",
                 mixtures=2))
