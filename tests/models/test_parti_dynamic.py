"""Parti on variable-length images (end_of_image, for LaVIT's dynamic
tokens): the targets are the codes then one scored EOI; cached decoding
equals the full forward; the sampler stops each row at its EOI, ends with
the longest row, and gives what an uncached decoder gives, plain, guided
or by CD-K."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import parti
from unimm.sampling.sampler import SamplingParams, processed_logits

B, S, T, V = 3, 6, 8, 17
MODEL = parti.Parti(**parti.parti_config(
    "tiny", text_vocab_size=20, image_vocab_size=V, text_length=S,
    image_length=T, embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8,
    num_kv_heads=2, encoder_layers=1, decoder_layers=2, end_of_image=True))
TEXT = jnp.array([[5, 6, 7, 1, 0, 0], [3, 1, 0, 0, 0, 0], [9, 9, 9, 9, 9, 1]])
UNCOND = jnp.array([[1, 0, 0, 0, 0, 0]] * B)
IDS = jnp.array([[3, 4, 5, -1, -1, -1, -1, -1],
                 list(range(8)),
                 [-1] * 8], jnp.int32)


def _params():
  params = MODEL.init(jax.random.key(0), TEXT, IDS)
  # Sharpen the EOI logit so greedy decoding ends rows at varied lengths.
  params = nn.unbox(params)
  kernel = params["params"]["logits"]["kernel"]
  params["params"]["logits"]["kernel"] = kernel.at[:, MODEL.eoi_id].multiply(
      3.0)
  return params


PARAMS = _params()


def test_targets_are_the_codes_then_one_scored_eoi():
  targets, weights = parti.image_targets(MODEL, IDS)
  e = MODEL.eoi_id
  assert MODEL.bos_id == V + 1 and MODEL.output_vocab_size == V + 1
  np.testing.assert_array_equal(targets, [
      [3, 4, 5, e, e, e, e, e, e], list(range(8)) + [e], [e] * 9])
  np.testing.assert_array_equal(weights, [
      [1] * 4 + [0] * 5, [1] * 9, [1] + [0] * 8])


def test_cached_logits_equal_full_forward_over_variable_length_images():
  full = jax.jit(MODEL.apply)(PARAMS, TEXT, IDS)  # [B, T + 1, V + 1]
  assert full.shape == (B, T + 1, V + 1)
  targets, _ = parti.image_targets(MODEL, IDS)
  inputs = jnp.concatenate([jnp.full((B, 1), MODEL.bos_id), targets[:, :-1]],
                           1)
  encoded, mask = MODEL.apply(PARAMS, TEXT, method=parti.Parti.encode)
  cache = MODEL.init_cache(B, mask)
  step = jax.jit(lambda c, tok, pos, enc: MODEL.apply(
      PARAMS, tok, c, pos, enc, method=parti.Parti.decode_step))
  logits, cache = step(cache, inputs[:, :1], 0, encoded)
  cached = [logits]
  for i in range(1, T + 1):
    logits, cache = step(cache, inputs[:, i:i + 1], i, None)
    cached.append(logits)
  np.testing.assert_allclose(jnp.stack(cached, 1), full, atol=1e-5, rtol=1e-5)


def _uncached_greedy(sampling):
  """Greedy decoding by full forwards of the whole prefix, stopping at EOI,
  of sampling's scores (guidance or CD-K over [TEXT; UNCOND])."""
  text = jnp.concatenate([TEXT, UNCOND]) if sampling.doubled else TEXT
  encoded = MODEL.apply(PARAMS, text, method=parti.Parti.encode)
  apply = jax.jit(lambda seq: MODEL.apply(PARAMS, seq, *encoded,
                                          method=parti.Parti.decode))
  seq = jnp.full((len(text), T + 1), MODEL.bos_id, jnp.int32)
  done = np.zeros(B, bool)
  out = np.full((B, T + 1), -1, np.int64)
  for t in range(T + 1):
    logits = processed_logits(apply(seq)[:, t], sampling)
    token = np.asarray(jnp.argmax(logits, -1))[:B]
    token = np.where(done, MODEL.eoi_id, token)
    out[:, t] = np.where(done, -1, token)
    done |= token == MODEL.eoi_id
    if t < T:
      both = np.concatenate([token] * (len(text) // B))
      seq = seq.at[:, t + 1].set(both)
  out[out == MODEL.eoi_id] = -1
  return out[:, :T]


@pytest.mark.parametrize("sampling", [
    SamplingParams(0.0), SamplingParams(0.0, cfg_scale=3.0),
    SamplingParams(0.0, contrastive_alpha=0.5)])
def test_the_sampler_stops_each_row_at_its_eoi(sampling):
  sample = jax.jit(functools.partial(
      parti.sample_image_ids, MODEL, PARAMS, sampling=sampling,
      uncond_text_ids=UNCOND, return_steps=True))
  ids, calls = sample(TEXT, jax.random.key(0))
  ids = np.asarray(ids)
  assert ids.shape == (B, T)
  np.testing.assert_array_equal(ids, _uncached_greedy(sampling))
  lengths = (ids >= 0).sum(1)
  assert len(set(lengths.tolist())) > 1, ids  # the rows end apart
  # The loop ends with the longest row: the BOS call writes token 0, one
  # call each writes tokens 1 .. its EOI (index = its length, at most T).
  assert int(calls) == 1 + int(lengths.max())
  for row, n in zip(ids, lengths):  # codes, then -1 only
    assert (row[:n] >= 0).all() and (row[:n] < V).all() and (
        row[n:] == -1).all()


def test_temperature_samples_are_codes_then_empty_slots():
  ids = np.asarray(jax.jit(lambda rng: parti.sample_image_ids(
      MODEL, PARAMS, jnp.tile(TEXT, (20, 1)), rng, SamplingParams(1.0)))(
          jax.random.key(3)))
  lengths = (ids >= 0).sum(1)
  for row, n in zip(ids, lengths):
    assert (row[:n] >= 0).all() and (row[n:] == -1).all()
  assert 0 < lengths.mean() < T


def test_speculative_decoding_of_variable_length_images_is_an_error():
  with pytest.raises(ValueError, match="end_of_image"):
    parti.sample_image_ids(MODEL, PARAMS, TEXT, jax.random.key(0),
                           SamplingParams(0.0, sjd_window=4))
  with pytest.raises(ValueError, match="learned_2d"):
    MODEL.clone(positions="learned_2d", image_length=9).init(
        jax.random.key(0), TEXT, jnp.zeros((B, 9), jnp.int32))
