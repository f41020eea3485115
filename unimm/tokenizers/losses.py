"""Tokenizer losses (ViT-VQGAN §3.3).

L = L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2.
Each weight is a config field (config.loss.*); the task combines them.

- logit_laplace_nll: DALL-E (Ramesh et al. 2021, appendix A.3) likelihood.
- l2_loss: mean squared error on [0, 1] pixels.
- Perceptual: an LPIPS-style distance (Zhang et al. 2018) on a Flax VGG16,
  weights loaded from a local .npz (nothing is downloaded).
- Adversarial: StyleGAN non-saturating logistic loss and the R1 penalty
  (Mescheder et al. 2018; StyleGAN2 §B lazy regularization).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from unimm.nn.layers import partitioned

LOGIT_LAPLACE_EPS = 0.1  # DALL-E appendix A.3


# ----------------------------------------------------------------------------
# Logit-Laplace (DALL-E appendix A.3).
# ----------------------------------------------------------------------------


def map_pixels(x, eps: float = LOGIT_LAPLACE_EPS):
  """[0, 1] -> (eps, 1 - eps): x' = (1 - 2 eps) x + eps (DALL-E §A.3)."""
  return (1.0 - 2.0 * eps) * x + eps


def unmap_pixels(x, eps: float = LOGIT_LAPLACE_EPS):
  """Inverse of map_pixels, clipped to [0, 1]."""
  return jnp.clip((x - eps) / (1.0 - 2.0 * eps), 0.0, 1.0)


def logit_laplace_nll(mu, log_scale, target, eps: float = LOGIT_LAPLACE_EPS):
  """Mean negative log-likelihood of target pixels under the logit-Laplace.

  DALL-E appendix A.3: f(x | mu, b) = exp(-|logit(x) - mu| / b) /
  (2 b x (1 - x)) on x in (0, 1); pixels x in [0, 1] are first mapped to
  x' = (1 - 2 eps) x + eps so logit(x') is finite. Per element,
    -log f(x') = log 2 + ln b + log(x' (1 - x')) + |logit(x') - mu| / b
  (the log(x'(1-x')) term is the Jacobian of the logit; it does not depend
  on the model). mu, log_scale (= ln b) and target: [..., C], target in
  [0, 1]. Returns the mean over all elements.
  """
  x = map_pixels(target.astype(jnp.float32), eps)
  mu = mu.astype(jnp.float32)
  log_scale = log_scale.astype(jnp.float32)
  logit_x = jnp.log(x) - jnp.log1p(-x)
  nll = (jnp.log(2.0) + log_scale + jnp.log(x * (1.0 - x)) +
         jnp.abs(logit_x - mu) * jnp.exp(-log_scale))
  return jnp.mean(nll)


def logit_laplace_mean(mu, eps: float = LOGIT_LAPLACE_EPS):
  """The reconstruction in [0, 1] from the predicted location mu (DALL-E
  decodes sigmoid(mu) and undoes the eps mapping)."""
  return unmap_pixels(jax.nn.sigmoid(mu.astype(jnp.float32)), eps)


def psnr_uint8(a, b) -> np.ndarray:
  """Per-image PSNR (dB) of uint8 images [N, H, W, C] (host side)."""
  err = (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2
  mse = err.reshape(len(err), -1).mean(axis=1)
  return 10 * np.log10(255.0 ** 2 / np.maximum(mse, 1e-10))


def l2_loss(recon, target):
  """Mean squared error; both in [0, 1]."""
  return jnp.mean(jnp.square(recon.astype(jnp.float32) -
                             target.astype(jnp.float32)))


# ----------------------------------------------------------------------------
# Perceptual (LPIPS on VGG16).
# ----------------------------------------------------------------------------

# torchvision vgg16 `features` indices of the 13 convolutions, their widths,
# and after which conv a 2x2 max-pool follows.
VGG16_CONVS = ((0, 64), (2, 64), (5, 128), (7, 128), (10, 256), (12, 256),
               (14, 256), (17, 512), (19, 512), (21, 512), (24, 512),
               (26, 512), (28, 512))
VGG16_POOL_AFTER = (1, 3, 6, 9)  # positions in VGG16_CONVS
VGG16_TAPS = (1, 3, 6, 9, 12)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3
# LPIPS' input scaling layer (inputs in [-1, 1]).
LPIPS_SHIFT = np.array([-0.030, -0.088, -0.188], np.float32)
LPIPS_SCALE = np.array([0.458, 0.448, 0.450], np.float32)


class VGG16Features(nn.Module):
  """VGG16 conv trunk returning the five LPIPS feature maps."""
  dtype: str = "float32"

  @nn.compact
  def __call__(self, x):  # x: [B, H, W, 3] in [-1, 1]
    x = (x - LPIPS_SHIFT) / LPIPS_SCALE
    taps = []
    for i, (_, width) in enumerate(VGG16_CONVS):
      x = nn.Conv(width, (3, 3), padding=1, dtype=jnp.dtype(self.dtype),
                  kernel_init=partitioned(nn.initializers.lecun_normal(),
                                          (None, None, "conv_in", "conv_out")),
                  bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
                  name=f"conv{i}")(x)
      x = nn.relu(x)
      if i in VGG16_TAPS:
        taps.append(x)
      if i in VGG16_POOL_AFTER:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    return taps


def _normalize_channels(f, eps=1e-10):
  return f * jax.lax.rsqrt(jnp.sum(f * f, axis=-1, keepdims=True) + eps)


def lpips_distance(vgg_params, lin_weights, x, y):
  """LPIPS (Zhang et al. 2018): per-image distance [B].

  x, y: [B, H, W, 3] in [0, 1]. Features of each VGG16 stage are unit-
  normalised over channels, their squared difference weighted per channel
  by the (non-negative) linear heads, averaged over space and summed.
  """
  net = VGG16Features()
  fx = net.apply({"params": vgg_params}, x * 2.0 - 1.0)
  fy = net.apply({"params": vgg_params}, y * 2.0 - 1.0)
  total = 0.0
  for a, b, w in zip(fx, fy, lin_weights):
    d = jnp.square(_normalize_channels(a) - _normalize_channels(b))
    total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", d, w), axis=(1, 2))
  return total


def load_lpips_npz(path: str):
  """Loads LPIPS-VGG16 weights from an .npz in torch naming.

  Expected keys (a torchvision vgg16 `features` state_dict plus LPIPS' linear
  heads, saved with numpy): `features.{i}.weight` [O, I, 3, 3],
  `features.{i}.bias` [O] for i in the VGG16 conv indices, and
  `lin{k}.model.1.weight` [1, C_k, 1, 1] for k = 0..4.
  Returns (vgg_params, lin_weights) for lpips_distance.
  """
  with np.load(path, allow_pickle=False) as f:
    arrays = {k: f[k] for k in f.files}
  missing = [f"features.{i}.{p}" for i, _ in VGG16_CONVS
             for p in ("weight", "bias") if f"features.{i}.{p}" not in arrays]
  missing += [f"lin{k}.model.1.weight" for k in range(5)
              if f"lin{k}.model.1.weight" not in arrays]
  if missing:
    raise ValueError(
        f"{path} lacks LPIPS/VGG16 arrays {missing[:4]}...; expected "
        "torchvision vgg16 `features.*` and LPIPS `lin*.model.1.weight` keys "
        "(set config.loss.perceptual_weights to a converted .npz, or "
        "config.loss.perceptual_weight = 0).")
  vgg_params = {}
  for n, (i, width) in enumerate(VGG16_CONVS):
    w = arrays[f"features.{i}.weight"]
    if w.shape[0] != width or w.shape[2:] != (3, 3):
      raise ValueError(f"features.{i}.weight has shape {w.shape}; expected "
                       f"[{width}, C_in, 3, 3] in {path}.")
    vgg_params[f"conv{n}"] = {
        "kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),  # OIHW -> HWIO
        "bias": jnp.asarray(arrays[f"features.{i}.bias"]),
    }
  lin_weights = [jnp.asarray(arrays[f"lin{k}.model.1.weight"].reshape(-1))
                 for k in range(5)]
  return vgg_params, lin_weights


def make_perceptual_loss(path: str) -> Callable:
  """perceptual_loss(recon, target) -> scalar mean LPIPS, from an .npz.

  The weights are fixed (not trained): they are closed over as constants.
  """
  vgg_params, lin_weights = load_lpips_npz(path)

  def perceptual_loss(recon, target):  # [B, H, W, 3] in [0, 1]
    return jnp.mean(lpips_distance(vgg_params, lin_weights,
                                   recon.astype(jnp.float32),
                                   target.astype(jnp.float32)))

  return perceptual_loss


# ----------------------------------------------------------------------------
# Adversarial (StyleGAN logistic loss) and R1.
# ----------------------------------------------------------------------------


def generator_adversarial_loss(fake_logits):
  """Non-saturating: -log sigmoid(D(G(z))) = softplus(-D(G(z)))."""
  return jnp.mean(jax.nn.softplus(-fake_logits.astype(jnp.float32)))


def discriminator_adversarial_loss(real_logits, fake_logits):
  """softplus(D(fake)) + softplus(-D(real)) (StyleGAN logistic loss)."""
  return (jnp.mean(jax.nn.softplus(fake_logits.astype(jnp.float32))) +
          jnp.mean(jax.nn.softplus(-real_logits.astype(jnp.float32))))


def r1_penalty(discriminator_fn: Callable, real_images):
  """E ||d D(x) / d x||^2 on real images (Mescheder et al. 2018).

  discriminator_fn maps images [B, H, W, C] to logits [B] (or [B, 1]);
  examples are independent, so the gradient of the summed logits gives each
  image's own gradient. Multiply by gamma / 2 outside.
  """
  grads = jax.grad(lambda x: jnp.sum(discriminator_fn(x)))(
      real_images.astype(jnp.float32))
  return jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(
      range(1, grads.ndim))))


def psnr(recon, target, max_value: float = 255.0):
  """Mean over images of 10 log10(max^2 / MSE), in dB. [B, ...] inputs."""
  err = jnp.square(recon.astype(jnp.float32) - target.astype(jnp.float32))
  mse = jnp.mean(err, axis=tuple(range(1, err.ndim)))
  return jnp.mean(10.0 * jnp.log10(max_value ** 2 / jnp.maximum(mse, 1e-10)))


__all__ = ["map_pixels", "unmap_pixels", "logit_laplace_nll",
           "logit_laplace_mean", "l2_loss", "VGG16Features", "lpips_distance",
           "load_lpips_npz", "make_perceptual_loss",
           "generator_adversarial_loss", "discriminator_adversarial_loss",
           "r1_penalty", "psnr"]
