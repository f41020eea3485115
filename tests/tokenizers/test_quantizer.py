"""Tests for the factorized l2-normalised quantizer and codebook upkeep."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from unimm.tokenizers import quantizer as q

K, C, D = 16, 4, 8


def _quantizer_and_params(seed=0):
  module = q.FactorizedQuantizer(num_codes=K, code_dim=C, embed_dim=D)
  x = jax.random.normal(jax.random.PRNGKey(seed), (2, 5, D))
  params = nn.unbox(module.init(jax.random.PRNGKey(1), x))
  return module, params, x


def _np_normalize(a):
  a = np.asarray(a, np.float64)
  return a / np.sqrt((a * a).sum(-1, keepdims=True) + 1e-6)


def test_nearest_code_matches_brute_force():
  module, params, x = _quantizer_and_params()
  ids, _, _, latents = module.apply(params, x)
  codebook = _np_normalize(params["params"]["codebook"])
  z = np.asarray(latents, np.float64).reshape(-1, C)
  distances = ((z[:, None, :] - codebook[None]) ** 2).sum(-1)  # [N, K]
  np.testing.assert_array_equal(np.asarray(ids).reshape(-1),
                                distances.argmin(-1))
  np.testing.assert_allclose(np.linalg.norm(z, axis=-1), 1.0, atol=1e-5)
  encoded = module.apply(params, x, method=module.encode)
  np.testing.assert_array_equal(encoded, ids)


def test_straight_through_gradient():
  """d loss / d x equals the gradient as if quantization were the identity
  (exact here because the loss and the output projection are linear)."""
  module, params, x = _quantizer_and_params()
  weights = jax.random.normal(jax.random.PRNGKey(2), (2, 5, D))

  def quantized_loss(x):
    _, quantized, _, _ = module.apply(params, x)
    return jnp.sum(weights * quantized)

  def identity_loss(x):
    def body(mdl, x):
      return mdl.from_code(mdl.latents(x))
    return jnp.sum(weights * nn.apply(body, module)(params, x))

  g = jax.grad(quantized_loss)(x)
  np.testing.assert_allclose(g, jax.grad(identity_loss)(x), rtol=1e-5,
                             atol=1e-6)
  assert float(jnp.abs(g).max()) > 0


def test_commitment_and_codebook_loss_values():
  module, params, x = _quantizer_and_params()
  ids, quantized, losses, latents = module.apply(params, x)
  codebook = _np_normalize(params["params"]["codebook"])
  e = codebook[np.asarray(ids)]
  expected = np.mean((np.asarray(latents, np.float64) - e) ** 2)
  np.testing.assert_allclose(losses["commitment"], expected, rtol=1e-5)
  np.testing.assert_allclose(losses["codebook"], expected, rtol=1e-5)
  np.testing.assert_allclose(losses["vq"], expected * 1.25, rtol=1e-5)
  # The forward value of the quantized output is from_code(code), exactly.
  from_ids = module.apply(params, ids, method=module.embed_ids)
  np.testing.assert_allclose(quantized, from_ids, atol=1e-5)
  # Gradients: the codebook term reaches the codebook, not the encoder side.
  grads = jax.grad(lambda p: module.apply(p, x)[2]["codebook"])(params)
  assert float(jnp.abs(grads["params"]["codebook"]).max()) > 0
  assert float(jnp.abs(grads["params"]["to_code"]["kernel"]).max()) == 0


def test_usage_ema_and_perplexity():
  usage = jnp.zeros((4,))
  ids = jnp.array([[0, 0, 1, 3]])
  new = q.update_usage(usage, ids, decay=0.9)
  np.testing.assert_allclose(new, [0.2, 0.1, 0.0, 0.1], rtol=1e-6)
  np.testing.assert_allclose(q.perplexity(jnp.array([0, 1, 2, 3]), 4), 4.0,
                             rtol=1e-5)
  np.testing.assert_allclose(q.perplexity(jnp.array([2, 2, 2]), 4), 1.0,
                             rtol=1e-5)


def test_restart_revives_dead_codes():
  rng = jax.random.PRNGKey(0)
  codebook = q.l2_normalize(jax.random.normal(rng, (K, C)))
  usage = jnp.where(jnp.arange(K) < 4, 0.0, 5.0)  # codes 0..3 dead
  buffer = jax.random.normal(jax.random.PRNGKey(3), (32, C)) * 3.0
  new_codebook, new_usage, restarted = q.restart_dead_codes(
      codebook, usage, buffer, jax.random.PRNGKey(4), threshold=1.0)
  assert int(restarted) == 4
  np.testing.assert_array_equal(new_codebook[4:], codebook[4:])
  assert not np.allclose(new_codebook[:4], codebook[:4])
  # Restarted codes are (normalised) buffer latents, now at mean usage.
  normalized_buffer = _np_normalize(buffer)
  for row in np.asarray(new_codebook[:4]):
    assert np.isclose(np.abs(normalized_buffer - row).sum(-1), 0,
                      atol=1e-5).any()
  np.testing.assert_allclose(new_usage[:4], float(usage.mean()))
  np.testing.assert_array_equal(new_usage[4:], usage[4:])
  # Each revived code is now the nearest code for the latent it came from.
  revived_ids = q.nearest_codes(q.l2_normalize(new_codebook[:4]),
                                q.l2_normalize(new_codebook))
  np.testing.assert_array_equal(revived_ids, np.arange(4))


def test_latent_buffer_draws_in_proportion_to_quantization_error():
  codebook = q.l2_normalize(jnp.eye(C))  # [C, C]: the basis vectors
  latents = q.l2_normalize(jnp.array(
      [[1.0, 0.0, 0.0, 0.0],  # exactly code 0: zero error, never drawn
       [1.0, 1.0, 0.0, 0.0],  # between codes 0 and 1
       [0.0, 0.0, 1.0, -1.0]]))  # between codes 2 and 3
  ids = q.nearest_codes(latents, codebook)
  errors = q.quantization_error(latents, ids, codebook)
  np.testing.assert_allclose(errors, [0.0, 2 - np.sqrt(2), 2 - np.sqrt(2)],
                             atol=1e-5)
  buffer = q.update_latent_buffer(jnp.zeros((2000, C)), latents[None],
                                  jax.random.PRNGKey(0), errors=errors[None])
  drawn = np.asarray(q.nearest_codes(buffer, latents))
  counts = np.bincount(drawn, minlength=3)
  assert counts[0] == 0
  assert abs(counts[1] - 1000) < 120, counts  # equal errors, equal shares
  # Without errors every latent can be drawn.
  uniform = q.update_latent_buffer(jnp.zeros((2000, C)), latents,
                                   jax.random.PRNGKey(0))
  assert np.all(np.bincount(np.asarray(q.nearest_codes(uniform, latents)),
                            minlength=3) > 500)


def test_sharded_batch_gives_the_same_update_as_one_device():
  """Under jit with global arrays the counts are over the global batch."""
  devices = jax.devices()
  assert len(devices) == 8
  mesh = jax.make_mesh((8,), ("data",),
                       axis_types=(jax.sharding.AxisType.Auto,))
  ids = jax.random.randint(jax.random.PRNGKey(0), (16, 6), 0, K // 2)
  latents = q.l2_normalize(jax.random.normal(jax.random.PRNGKey(1),
                                             (16, 6, C)))
  codebook = q.l2_normalize(jax.random.normal(jax.random.PRNGKey(2), (K, C)))

  def step(ids, latents, codebook, usage, buffer, rng):
    r1, r2 = jax.random.split(rng)
    usage = q.update_usage(usage, ids, decay=0.5)
    buffer = q.update_latent_buffer(buffer, latents, r1)
    codebook, usage, _ = q.restart_dead_codes(codebook, usage, buffer, r2,
                                              threshold=0.25)
    return codebook, usage

  args = (ids, latents, codebook, jnp.zeros((K,)), jnp.zeros((K, C)),
          jax.random.PRNGKey(5))
  expected = jax.jit(step)(*jax.device_put(args, devices[0]))
  batch_sharding = NamedSharding(mesh, P("data"))
  replicated = NamedSharding(mesh, P())
  sharded = (jax.device_put(ids, batch_sharding),
             jax.device_put(latents, batch_sharding),
             *jax.device_put(args[2:], replicated))
  got = jax.jit(step)(*sharded)
  assert len(got[0].sharding.device_set) == 8
  np.testing.assert_allclose(got[0], expected[0], atol=1e-6)
  np.testing.assert_allclose(got[1], expected[1], atol=1e-6)
  # Codes that were never assigned (K/2..K-1) were restarted.
  assert not np.allclose(np.asarray(got[0])[K // 2:], codebook[K // 2:])
