"""The shared sampler against a toy decoder built from the shared stack."""
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
  cache = new_cache(first.shape[0] * (2 if sampling.cfg_scale is not None else 1))
  return samp.scan_decode(step, params, cache, first, 0, n, rng, sampling)[0]


def test_greedy_cached_equals_greedy_uncached():
  first = jnp.array([1, 5, 7], jnp.int32)
  cached = run(PARAMS, first, jax.random.key(0), 10, samp.SamplingParams(0.0))
  seq = first[:, None]
  for _ in range(10):  # recompute the whole prefix every step
    logits, _ = MODEL.apply(PARAMS, seq)
    seq = jnp.concatenate([seq, jnp.argmax(logits[:, -1], -1)[:, None]], 1)
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


def test_cfg_scale_one_equals_conditional_sampling():
  # Unconditional rows see different first tokens, so they have different
  # logits; with scale 1 they must not matter.
  first = jnp.array([3, 4], jnp.int32)
  plain = run(PARAMS, first, jax.random.key(7), 8, samp.SamplingParams(1.0))

  def step_with_other_uncond(params, cache, tokens, position):
    tokens = tokens.at[2:].set((tokens[2:] + 5) % V)
    return step(params, cache, tokens, position)

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
  stop = int(greedy[0, 3])  # row 0 stops at step 3 (or earlier)
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
    (dict(cfg_scale=-0.5), "cfg_scale")])
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
