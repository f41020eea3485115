"""Parti model: cached decoding is exact; sampling properties."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.models import parti
from unimm.sampling import sampler as samp
from unimm.sampling.sampler import SamplingParams

B, S, T, V = 3, 6, 10, 17
MODEL = parti.Parti(**parti.parti_config(
    "tiny", text_vocab_size=20, image_vocab_size=V, text_length=S,
    image_length=T, embed_dim=32, mlp_dim=64, num_heads=4, head_dim=8,
    num_kv_heads=2, encoder_layers=1, decoder_layers=2))
TEXT = jnp.array([[5, 6, 7, 1, 0, 0], [3, 1, 0, 0, 0, 0], [9, 9, 9, 9, 9, 1]])
UNCOND = jnp.array([[1, 0, 0, 0, 0, 0]] * B)
PARAMS = MODEL.init(jax.random.key(0), TEXT, jnp.zeros((B, T), jnp.int32))


@pytest.mark.parametrize("positions", ["learned", "learned_2d", "rope"])
def test_cached_logits_equal_full_forward(positions):
  t = 9  # a square grid for learned_2d
  model = MODEL.clone(positions=positions, image_length=t)
  params = jax.jit(model.init)(jax.random.key(0), TEXT,
                               jnp.zeros((B, t), jnp.int32))
  ids = jax.random.randint(jax.random.key(1), (B, t), 0, V)
  full = jax.jit(model.apply)(params, TEXT, ids)  # [B, T, V]
  encoded, mask = jax.jit(lambda p, x: model.apply(
      p, x, method=parti.Parti.encode))(params, TEXT)
  cache = model.init_cache(B, mask)
  inputs = jnp.concatenate([jnp.full((B, 1), model.bos_id), ids[:, :-1]], 1)
  step = jax.jit(lambda c, tok, pos, enc: model.apply(
      params, tok, c, pos, enc, method=parti.Parti.decode_step))
  logits, cache = step(cache, inputs[:, :1], 0, encoded)
  cached = [logits]
  for i in range(1, t):
    logits, cache = step(cache, inputs[:, i:i + 1], i, None)
    cached.append(logits)
  np.testing.assert_allclose(jnp.stack(cached, 1), full, atol=1e-5, rtol=1e-5)


@functools.partial(jax.jit, static_argnames="sampling")
def sample(text, rng, sampling):
  return parti.sample_image_ids(MODEL, PARAMS, text, rng, sampling, UNCOND)


def test_greedy_cached_tokens_equal_uncached():
  ids = sample(TEXT, jax.random.key(0), SamplingParams(0.0))
  assert ids.shape == (B, T)
  full = jax.jit(lambda image_ids: MODEL.apply(PARAMS, TEXT, image_ids))
  seq = jnp.zeros((B, T), jnp.int32)
  for t in range(T):  # uncached: the whole (padded) prefix every step
    seq = seq.at[:, t].set(jnp.argmax(full(seq)[:, t], -1))
  np.testing.assert_array_equal(ids, seq)


@pytest.mark.parametrize("cfg_scale", [None, 3.0])
def test_sjd_greedy_equals_greedy_decoding(cfg_scale):
  """Speculative Jacobi decoding at temperature 0 gives the greedy tokens
  (window 4 over 9 tokens: the window moves and meets the end), in at most
  image_length decoder calls."""
  greedy = SamplingParams(0.0, cfg_scale=cfg_scale)
  sjd = SamplingParams(0.0, cfg_scale=cfg_scale, sjd_window=4)
  ids, calls = jax.jit(lambda text: parti.sample_image_ids(
      MODEL, PARAMS, text, jax.random.key(0), sjd, UNCOND,
      return_steps=True))(TEXT)
  np.testing.assert_array_equal(ids, sample(TEXT, jax.random.key(0), greedy))
  assert 2 <= int(calls) <= T


def test_cfg_scale_one_is_conditional_sampling_and_seeded():
  sp = SamplingParams(3.0)
  plain = sample(TEXT, jax.random.key(5), sp)
  guided = sample(TEXT, jax.random.key(5), SamplingParams(3.0, cfg_scale=1.0))
  np.testing.assert_array_equal(plain, guided)
  np.testing.assert_array_equal(plain, sample(TEXT, jax.random.key(5), sp))
  assert not np.array_equal(plain, sample(TEXT, jax.random.key(6), sp))


def test_guided_logits_are_u_plus_s_times_c_minus_u_of_full_forwards(
    monkeypatch):
  """At scale s != 1 the logits the cached sampler draws from at every step
  equal u + s (c - u), c and u from full forwards with the prompt and with
  each row's own unconditional text (distinct rows: a mix-up would show)."""
  scale = 3.0
  uncond = jnp.array([[1, 0, 0, 0, 0, 0], [8, 1, 0, 0, 0, 0],
                      [4, 4, 2, 1, 0, 0]])
  seen = []
  mix = samp.guided_logits

  def recorded(logits, cfg_scale):
    guided = mix(logits, cfg_scale)
    jax.debug.callback(lambda g: seen.append(np.asarray(g)), guided,
                       ordered=True)
    return guided

  monkeypatch.setattr(samp, "guided_logits", recorded)
  ids = jax.jit(lambda text, uncond: parti.sample_image_ids(
      MODEL, PARAMS, text, jax.random.key(0),
      SamplingParams(0.0, cfg_scale=scale), uncond))(TEXT, uncond)
  assert len(seen) == T  # the prefill step and T - 1 scan steps
  full = jax.jit(MODEL.apply)
  c, u = full(PARAMS, TEXT, ids), full(PARAMS, uncond, ids)  # [B, T, V]
  want = u + scale * (c - u)
  np.testing.assert_allclose(np.stack(seen, axis=1), want, atol=1e-4,
                             rtol=1e-4)
  np.testing.assert_array_equal(ids, np.argmax(want, axis=-1))
  # The prompt matters, so a sampler that ignored either half would fail.
  assert np.abs(c - u).max() > 1e-2


def test_contrastive_decoding_needs_the_unconditional_prompt():
  """CD-K's amateur is the unconditional half of the doubled batch (greedy
  CD-K equals full forwards: tests/inference/test_inference.py)."""
  sampling = SamplingParams(0.0, contrastive_alpha=0.2, contrastive_k=2)
  assert sampling.doubled
  with pytest.raises(ValueError, match="contrastive_alpha=0.2: guidance and "
                     "CD-K need uncond_text_ids"):
    parti.sample_image_ids(MODEL, PARAMS, TEXT, jax.random.key(0), sampling)


def test_learned_2d_positions_need_a_square_grid():
  model = MODEL.clone(positions="learned_2d", image_length=10)
  with pytest.raises(ValueError, match="square token grid"):
    model.init(jax.random.key(0), TEXT, jnp.zeros((B, 10), jnp.int32))
