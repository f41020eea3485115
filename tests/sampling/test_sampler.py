"""The shared sampler against a toy decoder built from the shared stack."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import nn as unn
from unimm.sampling import sampler as samp

V, D, L, S = 24, 32, 2, 16


class ToyLM(nn.Module):
  @nn.compact
  def __call__(self, tokens, cache=None, cache_index=None):
    emb = unn.Embedder(V, D, name="embed")
    x = emb.encode(tokens)
    stack = unn.TransformerStack(num_layers=L, embed_dim=D, num_heads=4,
                                 num_kv_heads=1, head_dim=8, mlp_dim=64,
                                 causal=True, use_rope=True, name="decoder")
    if cache is None:
      return emb.decode(stack(x)), None
    x, cache = stack(x, cache=cache, cache_index=cache_index)
    return emb.decode(x), cache


MODEL = ToyLM()
PARAMS = MODEL.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))


def step(params, cache, tokens, position):
  logits, cache = MODEL.apply(params, tokens, cache=cache, cache_index=position)
  return logits[:, -1], cache


def new_cache(b):
  return unn.init_cache(L, b, S, 1, 8)


@functools.partial(jax.jit, static_argnames=("n", "sampling"))
def run(params, first, rng, n, sampling):
  cache = new_cache(first.shape[0] * (2 if sampling.doubled else 1))
  return samp.scan_decode(step, params, cache, first, 0, n, rng, sampling)[0]


def test_greedy_cached_equals_greedy_uncached():
  first = jnp.array([1, 5, 7], jnp.int32)
  cached = run(PARAMS, first, jax.random.key(0), 10, samp.SamplingParams(0.0))
  # Recompute the whole prefix every step: one compiled full forward over
  # a fixed-length row (causal, so the zeros after position t are unseen).
  full = jax.jit(lambda params, seq: MODEL.apply(params, seq)[0])
  seq = jnp.zeros((3, 11), jnp.int32).at[:, 0].set(first)
  for t in range(10):
    logits = full(PARAMS, seq)
    seq = seq.at[:, t + 1].set(jnp.argmax(logits[:, t], -1))
  np.testing.assert_array_equal(cached, seq[:, 1:])


def test_deterministic_per_seed_and_top_k_one_is_greedy():
  first = jnp.array([1, 2], jnp.int32)
  sp = samp.SamplingParams(temperature=4.0)
  a = run(PARAMS, first, jax.random.key(3), 12, sp)
  b = run(PARAMS, first, jax.random.key(3), 12, sp)
  c = run(PARAMS, first, jax.random.key(4), 12, sp)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = run(PARAMS, first, jax.random.key(0), 12, samp.SamplingParams(0.0))
  top1 = run(PARAMS, first, jax.random.key(5), 12,
             samp.SamplingParams(1.0, top_k=1))
  np.testing.assert_array_equal(greedy, top1)


def step_with_other_uncond(params, cache, tokens, position):
  """The toy step with the unconditional half fed (token + 5) % V."""
  b = tokens.shape[0] // 2
  tokens = tokens.at[b:].set((tokens[b:] + 5) % V)
  return step(params, cache, tokens, position)


def test_cfg_scale_one_equals_conditional_sampling():
  # Unconditional rows see different tokens, so they have different
  # logits; with scale 1 they must not matter.
  first = jnp.array([3, 4], jnp.int32)
  plain = run(PARAMS, first, jax.random.key(7), 8, samp.SamplingParams(1.0))
  cache = new_cache(4)
  guided, _ = jax.jit(lambda p, c: samp.scan_decode(
      step_with_other_uncond, p, c, first, 0, 8, jax.random.key(7),
      samp.SamplingParams(1.0, cfg_scale=1.0)))(PARAMS, cache)
  np.testing.assert_array_equal(plain, guided)


def test_filters_and_allowed_tokens():
  logits = jnp.log(jnp.array([[0.5, 0.3, 0.15, 0.05]]))
  kept = samp.filter_logits(logits, samp.SamplingParams(top_p=0.7))
  assert np.isfinite(kept[0, :2]).all() and (kept[0, 2:] < -1e30).all()
  kept = samp.filter_logits(logits, samp.SamplingParams(top_k=3))
  assert (kept[0, 3] < -1e30) and (kept[0, :3] > -1e30).all()
  allowed = jnp.arange(V) >= 10
  toks = jax.jit(lambda p: samp.scan_decode(
      step, p, new_cache(4), jnp.zeros(4, jnp.int32), 0, 12, jax.random.key(1),
      samp.SamplingParams(2.0), allowed=allowed)[0])(PARAMS)
  assert (np.asarray(toks) >= 10).all()


def test_while_decode_stops_at_stop_token():
  first = jnp.array([1, 2, 3], jnp.int32)
  greedy = run(PARAMS, first, jax.random.key(0), 12, samp.SamplingParams(0.0))
  stop = int(greedy[0, 3])  # row 0 stops at step 3 at the latest
  out, lengths, _, steps = jax.jit(lambda p: samp.while_decode(
      step, p, new_cache(3), first, 0, 12, jax.random.key(0),
      samp.SamplingParams(0.0), stop_tokens=[stop], pad_id=0))(PARAMS)
  out, lengths = np.asarray(out), np.asarray(lengths)
  g = np.asarray(greedy)
  for r in range(3):
    hits = np.where(g[r] == stop)[0]
    n = hits[0] + 1 if len(hits) else 12
    assert lengths[r] == n
    np.testing.assert_array_equal(out[r, :n], g[r, :n])
    assert (out[r, n:] == 0).all()
  assert int(steps) <= 12


def test_batch_sharded_over_8_devices_gives_same_tokens():
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  first = jnp.arange(8, dtype=jnp.int32) % V
  sp = samp.SamplingParams(4.0, top_p=0.9)
  single = run(PARAMS, first, jax.random.key(2), 6, sp)
  sharded_first = jax.device_put(
      first, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data")))
  sharded = run(PARAMS, sharded_first, jax.random.key(2), 6, sp)
  assert len(sharded_first.sharding.device_set) == 8
  np.testing.assert_array_equal(single, sharded)


@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(top_k=V + 1), "top_k"),
    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p"),
    (dict(cfg_scale=-0.5), "cfg_scale"),
    (dict(contrastive_alpha=0.0), "contrastive_alpha"),
    (dict(contrastive_alpha=1.5), "contrastive_alpha"),
    (dict(contrastive_alpha=float("nan")), "contrastive_alpha"),
    (dict(contrastive_k=0), "contrastive_k"),
    (dict(contrastive_alpha=0.1, contrastive_k=V + 1), "contrastive_k"),
    (dict(cfg_scale=2.0, contrastive_alpha=0.1),
     r"contrastive_alpha=0.1 and cfg_scale=2.0 .*Set cfg_scale=None")])
def test_bad_sampling_params(kwargs, match):
  with pytest.raises(ValueError, match=match):
    samp.SamplingParams(**kwargs).validate(V)


def test_seed_keys_are_distinct_over_64_bits_and_typed():
  np.testing.assert_array_equal(samp.seed_key(5), jax.random.PRNGKey(5))
  keys = {tuple(np.asarray(samp.seed_key(s)).tolist())
          for s in (0, 1, 2**32, 2**32 + 1, 2**64 - 1, -1, 2**63)}
  assert len(keys) == 6  # -1 is 2**64 - 1 (modulo 2**64), the rest differ
  for bad in (1.5, "0", True, None):
    with pytest.raises(TypeError, match="expected an int"):
      samp.seed_key(bad)
  with pytest.raises(ValueError, match=r"\[-2\*\*63, 2\*\*64\)"):
    samp.seed_key(2**64)


def log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def cd_scores(cond, uncond, alpha, k, allowed=None):
  """CD-K in float64 numpy: (scores with -inf outside the head, head)."""
  cond = np.asarray(cond, np.float64)
  if allowed is not None:
    cond = np.where(allowed, cond, -np.inf)
  expert = log_softmax(cond)
  probs = np.exp(expert)
  kth = -np.sort(-probs, axis=-1)[:, k - 1:k]
  head = probs >= alpha * kth
  return np.where(head, expert - log_softmax(np.asarray(uncond, np.float64)),
                  -np.inf), head


def cd(temperature=1.0, alpha=0.1, k=1, **kwargs):
  return samp.SamplingParams(temperature, contrastive_alpha=alpha,
                             contrastive_k=k, **kwargs).validate(V)


def draw(cond, uncond, sampling, allowed=None, seed=0, n=4000):
  """n draws from one [W] pair of logits (n rows of one doubled batch)."""
  logits = jnp.concatenate([jnp.tile(jnp.asarray(cond, jnp.float32), (n, 1)),
                            jnp.tile(jnp.asarray(uncond, jnp.float32),
                                     (n, 1))])
  return np.asarray(samp.next_token(
      logits, samp.draw_uniforms(jax.random.key(seed), (n,)), sampling,
      allowed))


@pytest.mark.parametrize("alpha,k", [(0.1, 1), (0.3, 3), (1.0, 2)])
def test_contrastive_greedy_is_argmax_over_head(alpha, k):
  logits = np.random.default_rng(k).normal(0, 2, (2 * 64, V))
  cond, uncond = logits[:64], logits[64:]
  scores, head = cd_scores(cond, uncond, alpha, k)
  got = samp.contrastive_logits(jnp.asarray(logits), alpha, k)
  got_head = np.asarray(got) > np.finfo(np.float32).min
  np.testing.assert_array_equal(got_head, head)
  np.testing.assert_allclose(np.asarray(got)[head], scores[head], atol=1e-4)
  assert (head.sum(-1) >= k).all() and (head.sum(-1) < V).all()
  ids = samp.next_token(jnp.asarray(logits), None, cd(0.0, alpha, k))
  np.testing.assert_array_equal(ids, scores.argmax(-1))


def test_contrastive_samples_lie_in_head_at_head_frequencies():
  rng = np.random.default_rng(0)
  cond, uncond = rng.normal(0, 2, 8), rng.normal(0, 2, 8)
  scores, head = cd_scores(cond[None], uncond[None], 0.2, 2)
  assert head.sum() == 4
  ids = draw(cond, uncond, cd(1.0, 0.2, 2))
  assert head[0, ids].all()
  freq = np.bincount(ids, minlength=8) / len(ids)
  expected = np.exp(scores[0] - scores[0].max())
  np.testing.assert_allclose(freq, expected / expected.sum(), atol=0.03)


@pytest.mark.parametrize("alpha,k,size", [(0.5, 1, 2), (0.5, 2, 3),
                                          (0.6, 3, 4)])
def test_contrastive_with_equal_halves_is_uniform_over_head(alpha, k, size):
  # log p_c - log p_u = 0 on every token: CD-K keeps the head and forgets
  # the expert's preferences inside it, whatever the temperature.
  probs = np.array([0.35, 0.25, 0.15, 0.1, 0.06, 0.04, 0.03, 0.02])
  logits = np.log(probs)
  ids = draw(logits, logits, cd(0.7, alpha, k), seed=k)
  freq = np.bincount(ids, minlength=8) / len(ids)
  np.testing.assert_allclose(freq[:size], 1 / size, atol=0.03)
  assert (freq[size:] == 0).all()


def test_contrastive_head_is_taken_over_allowed_tokens():
  # Token 0 holds most of the expert but is disallowed: the head is taken
  # over tokens 1-3 renormalised (0.5, 0.3, 0.2), so alpha 0.5 keeps 1 and
  # 2. Masking after the head would leave only the disallowed token 0.
  cond = np.log([0.89, 0.05, 0.03, 0.02, 0.01, 1e-4, 1e-4, 1e-4])
  uncond = np.zeros(8)
  allowed = jnp.isin(jnp.arange(8), jnp.array([1, 2, 3]))
  ids = draw(cond, uncond, cd(1.0, 0.5, 1), allowed)
  assert set(np.unique(ids)) == {1, 2}
  assert set(draw(cond, uncond, cd(0.0, 0.5, 1), allowed)) == {1}
  # Fewer allowed tokens than k: the head stays inside the allowed set.
  few = jnp.isin(jnp.arange(8), jnp.array([1, 7]))
  ids = draw(cond, uncond, cd(1.0, 1e-6, 3), few)
  assert set(np.unique(ids)) == {1, 7}


def test_contrastive_from_config_and_doubled():
  off = samp.SamplingParams.from_config(
      dict(cfg_scale=None, contrastive_alpha="", contrastive_k=3), V)
  assert off.contrastive_alpha is None and not off.doubled
  on = samp.SamplingParams.from_config(
      dict(cfg_scale="", contrastive_alpha="0.1", contrastive_k="2"), V)
  assert (on.contrastive_alpha, on.contrastive_k, on.doubled) == (0.1, 2,
                                                                   True)
  assert samp.SamplingParams(cfg_scale=1.0).doubled
  assert not samp.SamplingParams().doubled
  with pytest.raises(ValueError, match="contrastive_alpha=0.1 and cfg_scale"):
    samp.SamplingParams.from_config(
        dict(cfg_scale=3.0, contrastive_alpha=0.1), V)


def test_contrastive_scan_equals_step_by_step_reference():
  # The scan feeds both halves the chosen token and keeps a 2B-row cache;
  # the reference recomputes both halves' whole prefixes every step (one
  # padded shape: the model is causal) and scores CD-K in numpy.
  first = jnp.array([3, 4], jnp.int32)
  n = 6
  toks, _ = jax.jit(lambda p: samp.scan_decode(
      step_with_other_uncond, p, new_cache(4), first, 0, n,
      jax.random.key(0), cd(0.0, 0.1, 2)))(PARAMS)
  forward = jax.jit(lambda p, seq: MODEL.apply(p, seq)[0])
  seq = np.zeros((2, n + 1), np.int32)
  seq[:, 0] = first
  for i in range(n):
    logits = np.asarray(forward(PARAMS, np.concatenate([seq, (seq + 5) % V])))
    cond, uncond = np.split(logits[:, i], 2)
    seq[:, i + 1] = cd_scores(cond, uncond, 0.1, 2)[0].argmax(-1)
  np.testing.assert_array_equal(toks, seq[:, 1:])


# Speculative Jacobi decoding against a second-order Markov chain over a
# small vocabulary: logits of the token after slot j are TABLE[x_{j-1},
# x_j], read from a cache of the tokens fed so far, so every draft's
# context matters and the exact marginals are a short recursion.
MV, MN = 4, 5  # vocabulary, tokens decoded
MARKOV = 1.5 * jax.random.normal(jax.random.key(11), (MV, MV, MV))
MARKOV_UNCOND = 1.5 * jax.random.normal(jax.random.key(12), (MV, MV, MV))


def markov_window_step(params, cache, tokens, position):
  """tokens [B', W] at slots position.. -> (logits [B', W, MV], cache);
  the second half of a doubled batch reads MARKOV_UNCOND."""
  del params
  cache = jax.lax.dynamic_update_slice(cache, tokens, (0, position))
  before = jax.lax.dynamic_slice_in_dim(jnp.pad(cache, ((0, 0), (1, 0))),
                                        position, tokens.shape[1], axis=1)
  logits = MARKOV[before, tokens]  # [B', W, MV]
  if tokens.shape[0] % 2 == 0:  # the doubled tests' batches are odd
    half = tokens.shape[0] // 2
    logits = logits.at[half:].set(MARKOV_UNCOND[before[half:], tokens[half:]])
  return logits, cache


def markov_step(params, cache, tokens, position):
  logits, cache = markov_window_step(params, cache, tokens, position)
  return logits[:, -1], cache


@functools.partial(jax.jit, static_argnames=("n", "sampling", "sjd"))
def markov_decode(first, rng, n, sampling, sjd=True):
  rows = first.shape[0] * (2 if sampling.doubled else 1)
  cache = jnp.zeros((rows, n), jnp.int32)
  if sjd:
    return samp.sjd_decode(markov_window_step, None, cache, first, 0, n, rng,
                           sampling)[::2]
  return samp.scan_decode(markov_step, None, cache, first, 0, n, rng,
                          sampling)[0], jnp.int32(n)


def markov_marginals(first: int, n: int, sampling=None):
  """Exact P(token i = v) [n, MV] of plain sampling at temperature 1 with
  sampling's scores (guidance or CD-K over [MARKOV; MARKOV_UNCOND], top-k,
  top-p: samp.processed_logits, applied to every context's logits)."""
  sampling = sampling or samp.SamplingParams(1.0)
  logits = MARKOV.reshape(MV * MV, MV)  # [prev * cur, next]
  if sampling.doubled:
    logits = jnp.concatenate([logits, MARKOV_UNCOND.reshape(MV * MV, MV)])
  scores = np.asarray(samp.processed_logits(logits, sampling), np.float64)
  probs = np.exp(scores - scores.max(-1, keepdims=True))
  probs = (probs / probs.sum(-1, keepdims=True)).reshape(MV, MV, MV)
  pair = np.zeros((MV, MV))  # P(x_{i-1}, x_i); slot -1 reads 0 (padding)
  pair[0, first] = 1.0
  out = []
  for _ in range(n):
    pair = np.einsum("ab,abc->bc", pair, probs)
    out.append(pair.sum(0))
  return np.stack(out)


@pytest.mark.parametrize("window,cfg_scale", [(3, None), (8, 2.5)])
def test_sjd_greedy_equals_greedy(window, cfg_scale):
  first = jnp.array([0, 1, 2], jnp.int32)
  greedy = samp.SamplingParams(0.0, cfg_scale=cfg_scale)
  plain, _ = markov_decode(first, jax.random.key(0), MN, greedy, sjd=False)
  sjd = dataclasses.replace(greedy, sjd_window=window)
  out, calls = markov_decode(first, jax.random.key(0), MN, sjd)
  np.testing.assert_array_equal(out, plain)
  assert 1 <= int(calls) <= MN


@pytest.mark.parametrize("settings", [
    {}, dict(cfg_scale=2.5), dict(contrastive_alpha=0.2),
    dict(contrastive_alpha=0.05, contrastive_k=2), dict(top_p=0.8)])
def test_sjd_samples_from_the_plain_distribution(settings):
  """Token frequencies at every position of 4001 rows (one call) against
  the exact marginals of plain sampling with the same scores (guidance,
  CD-K or top-p): Pearson's chi-square with MV - 1 = 3 degrees of freedom
  (fewer where the scores rule tokens out) is below 25 (P[chi2_3 > 25] =
  1.6e-5, so over the 25 checks a correct sampler fails with probability
  < 5e-4; the seed is fixed). A sampler that accepted drafts without the
  p/q test, or drew the rejected position from p instead of the residual,
  is off by chi-square values in the hundreds here."""
  rows = 4001
  first = jnp.full((rows,), 1, jnp.int32)
  sampling = samp.SamplingParams(1.0, sjd_window=3, **settings).validate(MV)
  out, calls = markov_decode(first, jax.random.key(3), MN, sampling)
  assert int(calls) <= MN
  want = markov_marginals(1, MN, sampling)
  for i in range(MN):
    counts = np.bincount(np.asarray(out[:, i]), minlength=MV)
    assert np.all(counts[want[i] == 0] == 0), (i, counts, want[i])
    drawn = want[i] > 0
    expected = rows * want[i][drawn]
    chi2 = np.sum((counts[drawn] - expected) ** 2 / expected)
    assert chi2 < 25, (i, counts, expected)


def test_sjd_draws_only_allowed_tokens_of_the_top_k():
  """2001 rows (odd: see markov_window_step) at temperature 1, token 3
  disallowed and top_k=2: every token (drafts accepted, residual draws,
  the extra draw) is one of the two likeliest allowed tokens after its
  context, and both occur."""
  rows = 2001
  first = jnp.full((rows,), 1, jnp.int32)
  allowed = jnp.array([True, True, True, False])
  sampling = samp.SamplingParams(1.0, top_k=2, sjd_window=3)
  out, _, _ = jax.jit(lambda rng: samp.sjd_decode(
      markov_window_step, None, jnp.zeros((rows, MN), jnp.int32), first, 0,
      MN, rng, sampling, allowed=allowed))(jax.random.key(5))
  out = np.asarray(out)
  seq = np.concatenate([np.zeros((rows, 1), np.int32), first[:, None], out],
                       axis=1)  # slot -1 reads 0, as the window step's
  logits = np.where(np.asarray(allowed), np.asarray(MARKOV), -np.inf)
  top2 = np.argsort(-logits, axis=-1)[..., :2]  # [prev, cur, 2]
  for i in range(MN):
    heads = top2[seq[:, i], seq[:, i + 1]]  # [rows, 2]
    assert np.all((out[:, i, None] == heads).any(-1)), i
    assert len(np.unique(out[:, i])) >= 2


def predictable_window_step(params, cache, tokens, position):
  """The next token depends on the position only (a fixed pattern)."""
  del params
  slots = position + jnp.arange(tokens.shape[1])  # [W]
  logits = 30.0 * jax.nn.one_hot((3 * slots + 1) % V, V)  # [W, V]
  return jnp.broadcast_to(logits, tokens.shape + (V,)), cache


def test_sjd_needs_fewer_calls_on_a_predictable_model():
  n, window = 24, 4
  sampling = samp.SamplingParams(1.0, sjd_window=window)
  out, _, calls = jax.jit(lambda rng: samp.sjd_decode(
      predictable_window_step, None, None, jnp.zeros((2,), jnp.int32), 0, n,
      rng, sampling))(jax.random.key(0))
  np.testing.assert_array_equal(out, np.broadcast_to(
      (3 * np.arange(n) + 1) % V, (2, n)))
  # A call whose drafts all pass makes W tokens but has no drafts beyond
  # its window (they restart uniform), so the next makes one: W + 1 tokens
  # every two calls, 10 calls for 24 tokens.
  assert int(calls) <= n // 2


@pytest.mark.parametrize("window", [1, -2, 2.5, True, "4"])
def test_bad_sjd_window(window):
  with pytest.raises(ValueError, match=r"sjd_window=.*expected 0 \(off"):
    samp.SamplingParams.from_config(dict(sjd_window=window), V)
  with pytest.raises(ValueError, match="sjd_window"):
    samp.sjd_decode(markov_window_step, None, None, jnp.zeros((1,), jnp.int32),
                    0, MN, jax.random.key(0),
                    samp.SamplingParams(sjd_window=window))
  assert samp.SamplingParams.from_config(
      dict(sjd_window=""), V).sjd_window == 0
