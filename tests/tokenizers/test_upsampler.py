"""The super-resolution module: sizes, shapes, determinism, bicubic at init."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.tokenizers import upsampler as upsampler_lib


def _inputs(b=2, s=16, grid=4, d=8, seed=0):
  rng = np.random.default_rng(seed)
  base = jnp.asarray(rng.uniform(size=(b, s, s, 3)), jnp.float32)
  codes = jnp.asarray(rng.normal(size=(b, grid, grid, d)), jnp.float32)
  return base, codes


@pytest.mark.parametrize("factor", [2, 4])
def test_output_shape_dtype_and_determinism(factor):
  model = upsampler_lib.Upsampler(factor=factor, width=8, expansion=2,
                                  num_blocks=2, predict_scale=True)
  base, codes = _inputs()
  params = model.init(jax.random.PRNGKey(0), base, codes)["params"]
  # The head starts at zero so the module starts as bicubic upsampling.
  params = jax.tree.map(lambda x: x + 0.01, params)
  mu, log_scale = model.apply({"params": params}, base, codes)
  assert mu.shape == log_scale.shape == (2, 16 * factor, 16 * factor, 3)
  assert mu.dtype == jnp.float32
  again, _ = model.apply({"params": params}, base, codes)
  np.testing.assert_array_equal(np.asarray(mu), np.asarray(again))
  # Each image's output depends on its own inputs only.
  one, _ = model.apply({"params": params}, base[:1], codes[:1])
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(mu[0]), atol=1e-5)
  # The code vectors condition the output.
  other, _ = model.apply({"params": params}, base, codes * -1.0)
  assert np.abs(np.asarray(other - mu)).max() > 1e-4


def test_starts_as_bicubic_upsampling():
  model = upsampler_lib.Upsampler(factor=4, width=8, expansion=2,
                                  num_blocks=1)
  base, codes = _inputs()
  params = model.init(jax.random.PRNGKey(1), base, codes)["params"]
  mu, log_scale = model.apply({"params": params}, base, codes)
  assert log_scale is None
  expected = jax.image.resize(base, (2, 64, 64, 3), "bicubic")
  np.testing.assert_allclose(np.asarray(mu), np.asarray(expected), atol=1e-6)


def test_pixel_shuffle_moves_channels_to_space():
  x = jnp.arange(2 * 3 * 3 * 12, dtype=jnp.float32).reshape(2, 3, 3, 12)
  y = upsampler_lib.pixel_shuffle(x, 2)
  assert y.shape == (2, 6, 6, 3)
  # Output pixel (2i + a, 2j + b) channel c is input (i, j) channel
  # (a * 2 + b) * 3 + c.
  for a in range(2):
    for b in range(2):
      np.testing.assert_array_equal(
          np.asarray(y[:, a::2, b::2, :]),
          np.asarray(x[..., (a * 2 + b) * 3:(a * 2 + b) * 3 + 3]))


def test_size_table_has_the_papers_parameter_counts():
  counts = {}
  for size, factor in (("paper_x2", 2), ("paper_x4", 4)):
    model = upsampler_lib.Upsampler(
        **upsampler_lib.upsampler_config(size, factor))
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0),
                            jnp.zeros((1, 256, 256, 3)),
                            jnp.zeros((1, 32, 32, 768)))
    counts[size] = sum(x.size for x in jax.tree.leaves(shapes))
  # Parti §2.1: about 15M parameters for 2x and 30M for 4x.
  assert 13e6 < counts["paper_x2"] < 17e6, counts
  assert 27e6 < counts["paper_x4"] < 33e6, counts


def test_bad_factor_and_size_name_the_setting():
  with pytest.raises(ValueError, match="factor 3 .*expected one of"):
    upsampler_lib.upsampler_config("tiny", 3)
  with pytest.raises(ValueError, match="size 'huge'"):
    upsampler_lib.upsampler_config("huge", 4)
