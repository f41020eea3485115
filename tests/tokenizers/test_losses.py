"""Tests for the tokenizer losses and the StyleGAN discriminator."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.tokenizers import losses
from unimm.tokenizers.discriminator import (StyleGANDiscriminator, blur,
                                            minibatch_stddev)


def _numpy_logit_laplace_nll(mu, log_b, x, eps=0.1):
  """DALL-E appendix A.3, written out in float64."""
  x = (1 - 2 * eps) * np.asarray(x, np.float64) + eps
  b = np.exp(np.asarray(log_b, np.float64))
  density = np.exp(-np.abs(np.log(x / (1 - x)) - mu) / b) / (2 * b * x *
                                                              (1 - x))
  return -np.log(density).mean()


def test_logit_laplace_matches_numpy_reference():
  rng = np.random.default_rng(0)
  mu = rng.normal(size=(2, 4, 4, 3))
  log_b = rng.normal(size=(2, 4, 4, 3)) * 0.5
  x = rng.uniform(size=(2, 4, 4, 3))
  got = losses.logit_laplace_nll(jnp.asarray(mu), jnp.asarray(log_b),
                                 jnp.asarray(x))
  np.testing.assert_allclose(got, _numpy_logit_laplace_nll(mu, log_b, x),
                             rtol=1e-5)


def test_logit_laplace_minimised_at_the_target():
  x = jnp.asarray(np.random.default_rng(1).uniform(size=(64,)))
  x_mapped = losses.map_pixels(x)
  mu_star = jnp.log(x_mapped) - jnp.log1p(-x_mapped)  # logit(x')
  log_b = jnp.full_like(x, -1.0)
  best = losses.logit_laplace_nll(mu_star, log_b, x)
  for delta in (-0.3, -0.01, 0.01, 0.3):
    assert losses.logit_laplace_nll(mu_star + delta, log_b, x) > best
  # The reconstruction read from mu* is the target itself.
  np.testing.assert_allclose(losses.logit_laplace_mean(mu_star), x, atol=1e-5)
  # It is not an L1 loss: the scale term and the Jacobian term are present.
  l1 = jnp.mean(jnp.abs(mu_star + 0.3 - mu_star))
  assert not np.isclose(losses.logit_laplace_nll(mu_star + 0.3, log_b, x), l1)


def test_l2_and_psnr():
  a = jnp.zeros((2, 4, 4, 3))
  np.testing.assert_allclose(losses.l2_loss(a, a + 0.5), 0.25)
  np.testing.assert_allclose(losses.psnr(a, a + 255.0 / 10), 20.0, rtol=1e-5)


def test_adversarial_losses():
  logits = jnp.array([0.0, 0.0])
  np.testing.assert_allclose(losses.generator_adversarial_loss(logits),
                             np.log(2), rtol=1e-6)
  np.testing.assert_allclose(
      losses.discriminator_adversarial_loss(logits, logits), 2 * np.log(2),
      rtol=1e-6)
  # A confident, correct discriminator has a small loss.
  assert losses.discriminator_adversarial_loss(jnp.array([9.0]),
                                               jnp.array([-9.0])) < 1e-3


def test_r1_penalty():
  images = jax.random.normal(jax.random.PRNGKey(0), (3, 8, 8, 3))
  constant = lambda x: jnp.full((x.shape[0],), 3.0)  # noqa: E731
  assert float(losses.r1_penalty(constant, images)) == 0.0
  w = jax.random.normal(jax.random.PRNGKey(1), (8, 8, 3))
  linear = lambda x: jnp.einsum("bhwc,hwc->b", x, w)  # noqa: E731
  np.testing.assert_allclose(losses.r1_penalty(linear, images),
                             jnp.sum(w * w), rtol=1e-5)


def _random_lpips_npz(path):
  rng = np.random.default_rng(0)
  arrays, c_in = {}, 3
  for i, width in losses.VGG16_CONVS:
    arrays[f"features.{i}.weight"] = (rng.normal(size=(width, c_in, 3, 3)) *
                                      np.sqrt(2.0 / (9 * c_in))).astype(
                                          np.float32)
    arrays[f"features.{i}.bias"] = np.zeros(width, np.float32)
    c_in = width
  for k, width in enumerate((64, 128, 256, 512, 512)):
    arrays[f"lin{k}.model.1.weight"] = rng.uniform(
        size=(1, width, 1, 1)).astype(np.float32)
  np.savez(path, **arrays)


def test_perceptual_loss_from_npz(tmp_path):
  path = str(tmp_path / "lpips_vgg16.npz")
  _random_lpips_npz(path)
  perceptual = jax.jit(losses.make_perceptual_loss(path))
  x = jax.random.uniform(jax.random.PRNGKey(0), (2, 16, 16, 3))
  y = jax.random.uniform(jax.random.PRNGKey(1), (2, 16, 16, 3))
  assert float(perceptual(x, x)) == pytest.approx(0.0, abs=1e-6)
  assert float(perceptual(x, y)) > 1e-3
  np.savez(str(tmp_path / "bad.npz"), x=np.zeros(3))
  with pytest.raises(ValueError, match="perceptual_weights"):
    losses.load_lpips_npz(str(tmp_path / "bad.npz"))


def test_discriminator_output_shape_and_gradients():
  d = StyleGANDiscriminator(image_size=16, channel_multiplier=4,
                            max_channels=8)
  x = jax.random.uniform(jax.random.PRNGKey(0), (6, 16, 16, 3))
  params = nn.unbox(d.init(jax.random.PRNGKey(1), x))
  logits = d.apply(params, x)
  assert logits.shape == (6,)
  assert d.channels(16) == 4 and d.channels(8) == 8 and d.channels(4) == 8
  grads = jax.grad(lambda p: jnp.sum(d.apply(p, x)))(params)
  assert all(np.isfinite(g).all() for g in jax.tree.leaves(grads))
  with pytest.raises(ValueError, match="power-of-two"):
    StyleGANDiscriminator(image_size=24).init(
        jax.random.PRNGKey(0), jnp.zeros((2, 24, 24, 3)))


def test_blur_and_minibatch_stddev():
  x = jax.random.normal(jax.random.PRNGKey(0), (4, 8, 8, 2))
  k = np.outer([1, 3, 3, 1], [1, 3, 3, 1]).astype(np.float32) / 64
  ref = jax.lax.conv_general_dilated(
      x, jnp.tile(k[:, :, None, None], (1, 1, 1, 2)), (1, 1),
      ((2, 2), (2, 2)), dimension_numbers=("NHWC", "HWIO", "NHWC"),
      feature_group_count=2)
  np.testing.assert_allclose(blur(x, 2), ref, atol=1e-5)
  y = minibatch_stddev(x, group_size=4)
  assert y.shape == (4, 8, 8, 3)
  expected = np.sqrt(np.var(np.asarray(x), axis=0) + 1e-8).mean()
  np.testing.assert_allclose(y[..., -1], expected, rtol=1e-5)
