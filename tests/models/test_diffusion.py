"""The diffusion de-tokenizer: its scan sampler, guidance, null condition,
source image and input checks."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm.models import diffusion
from unimm.sampling import flow

K, D = 5, 6


def _model(**kw):
  config = diffusion.diffusion_config(
      "tiny", image_size=8, condition_length=K, condition_dim=D,
      embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32, patch_size=4)
  return diffusion.DiffusionDecoder(**{**config, **kw})


def _init(model, b=3, source=False):
  x = jnp.zeros((b, 8, 8, 3))
  return model.init(jax.random.key(0), x, jnp.zeros((b,)),
                    jnp.zeros((b, K, D)), None,
                    x if source else None)["params"]


def _condition(b=3, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, K, D))


def test_the_scan_sampler_is_a_loop_of_euler_steps():
  model = _model()
  params = _init(model)
  condition = _condition()
  rng = jax.random.key(2)
  got = diffusion.sample(model, params, condition, rng, num_steps=4)
  x = jax.random.normal(rng, (3, 8, 8, 3))
  times = np.linspace(1.0, 0.0, 5)
  for t, t_next in zip(times[:-1], times[1:]):
    v = diffusion.velocity(model, params, x, jnp.full((3,), t), condition)
    x = x + (t_next - t) * v
  np.testing.assert_allclose(got, np.clip((x + 1) / 2, 0, 1), atol=1e-5)


def test_guidance_at_one_is_the_conditional_model_and_mixes_otherwise():
  model = _model()
  params = _init(model)
  condition = _condition()
  rng = jax.random.key(3)
  plain = diffusion.sample(model, params, condition, rng, num_steps=3)
  at_one = diffusion.sample(model, params, condition, rng, num_steps=3,
                            cfg_scale=1.0)
  np.testing.assert_allclose(at_one, plain, atol=1e-5)
  # One step from noise, s = 3: u + 3 (c - u) from two plain forwards.
  noise = jax.random.normal(rng, (3, 8, 8, 3))
  t = jnp.ones((3,))
  cond = diffusion.velocity(model, params, noise, t, condition)
  null = diffusion.velocity(model, params, noise, t, condition,
                            jnp.zeros((3,), bool))
  expected = np.clip((noise - (null + 3 * (cond - null)) + 1) / 2, 0, 1)
  np.testing.assert_allclose(
      diffusion.sample(model, params, condition, rng, num_steps=1,
                       cfg_scale=3.0), expected, atol=1e-5)
  assert not np.allclose(cond, null)


def test_the_null_condition_ignores_the_condition_per_example():
  model = _model()
  params = _init(model)
  x, t = jax.random.normal(jax.random.key(4), (3, 8, 8, 3)), jnp.full((3,), .5)
  use = jnp.array([True, False, True])
  a = model.apply({"params": params}, x, t, _condition(seed=1), use)
  b = model.apply({"params": params}, x, t, _condition(seed=2), use)
  np.testing.assert_allclose(a[1], b[1], atol=1e-6)
  assert not np.allclose(a[0], b[0]) and not np.allclose(a[2], b[2])


def test_a_source_image_conditions_the_edit_decoder():
  model = _model(source_image=True)
  params = _init(model, source=True)
  condition = _condition()
  rng = jax.random.key(5)
  sources = jax.random.uniform(jax.random.key(6), (2, 3, 8, 8, 3))
  a, b = (diffusion.sample(model, params, condition, rng, num_steps=2,
                           source01=s) for s in sources)
  assert not np.allclose(a, b)
  # No source is the zero image (data range) the training's dropped
  # sources get; a decoder without a source input refuses one.
  none = diffusion.sample(model, params, condition, rng, num_steps=2)
  grey = diffusion.sample(model, params, condition, rng, num_steps=2,
                          source01=jnp.full((3, 8, 8, 3), 0.5))
  np.testing.assert_allclose(none, grey, atol=1e-6)
  assert not np.allclose(none, a)
  plain = _model()
  with pytest.raises(ValueError, match="drop source="):
    diffusion.sample(plain, _init(plain), condition, rng, num_steps=2,
                     source01=sources[0])


def test_dropped_sources_are_the_zero_image_in_the_loss():
  model = _model(source_image=True)
  params = _init(model, b=4, source=True)
  images = jax.random.uniform(jax.random.key(7), (4, 8, 8, 3))
  sources = jax.random.uniform(jax.random.key(8), (4, 8, 8, 3))
  rng = jax.random.key(9)
  loss = lambda **kw: diffusion.flow_matching_loss(  # pylint: disable=unnecessary-lambda-assignment
      model, params, images, _condition(4), rng, **kw)[0]
  grey = jnp.full_like(sources, 0.5)
  np.testing.assert_allclose(loss(source01=sources, source_drop_rate=1.0),
                             loss(source01=grey), rtol=1e-6)
  assert not np.isclose(loss(source01=sources), loss(source01=grey))


def test_the_loss_falls_on_a_fixed_batch():
  model = _model()
  params = _init(model, b=4)
  images = jax.random.uniform(jax.random.key(7), (4, 8, 8, 3))
  condition = _condition(b=4)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state, rng):
    loss, grads = jax.value_and_grad(lambda p: diffusion.flow_matching_loss(
        model, p, images, condition, rng, condition_drop_rate=0.1)[0])(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  opt_state = tx.init(params)
  losses = []
  for i in range(80):  # the same 4 draws of (t, noise) over and over
    params, opt_state, loss = step(params, opt_state,
                                   jax.random.fold_in(jax.random.key(8), i % 4))
    losses.append(float(loss))
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), losses


def test_the_velocity_loss_is_the_image_loss_over_t_squared():
  model = _model()
  params = _init(model, b=1)
  images = jax.random.uniform(jax.random.key(9), (1, 8, 8, 3))
  rng = jax.random.key(10)
  losses = {target: float(diffusion.flow_matching_loss(
      model, params, images, _condition(b=1), rng, target=target)[0])
            for target in ("x", "v")}
  t = float(jax.random.uniform(jax.random.split(rng, 3)[0], (1,))[0])
  np.testing.assert_allclose(
      losses["v"], losses["x"] / max(t, diffusion.T_MIN) ** 2, rtol=1e-4)
  with pytest.raises(ValueError, match="target='eps'"):
    diffusion.flow_matching_loss(model, params, images, _condition(b=1), rng,
                                 target="eps")


def test_bad_inputs_are_clear_errors():
  model = _model()
  params = _init(model)
  rng = jax.random.key(0)
  with pytest.raises(ValueError, match=r"expected \[3, 5, 6\]"):
    diffusion.sample(model, params, jnp.zeros((3, K + 1, D)), rng,
                     num_steps=2)
  with pytest.raises(ValueError, match=r"expected \[3, 5, 6\]"):
    diffusion.sample(model, params, jnp.zeros((3, K, D - 1)), rng,
                     num_steps=2)
  for steps in (0, 1.5, True):
    with pytest.raises(ValueError, match="num_steps"):
      diffusion.sample(model, params, _condition(), rng, num_steps=steps)
  with pytest.raises(ValueError, match="Images of shape"):
    model.apply({"params": params}, jnp.zeros((3, 16, 16, 3)),
                jnp.zeros((3,)), _condition())
  with pytest.raises(ValueError, match="Unknown diffusion decoder size"):
    diffusion.diffusion_config("huge")
  with pytest.raises(ValueError, match="does not divide"):
    _model(patch_size=3).apply({"params": params}, jnp.zeros((3, 8, 8, 3)),
                               jnp.zeros((3,)), _condition())
  assert flow.check_steps(32) == 32
