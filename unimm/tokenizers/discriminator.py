"""StyleGAN2-style discriminator (Karras et al. 2020, "residual" D, fig. 7).

Images [B, H, W, C] -> logits [B]. From RGB (1x1 conv), then one residual
block per resolution halving down to 4x4 (two 3x3 convs, the second after a
[1, 3, 3, 1] blur with stride 2; a blurred, strided 1x1 skip; sum scaled by
1/sqrt(2)), then minibatch standard deviation (StyleGAN2 §B / ProGAN §3),
a 3x3 conv, and two dense layers. Leaky ReLU (0.2) scaled by sqrt(2) as in
StyleGAN. Equalized learning rate is not used (plain Adam-friendly inits).
"""
import math

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from unimm.nn.layers import conv
from unimm.nn.layers import partitioned



def leaky_relu(x):
  return nn.leaky_relu(x, 0.2) * math.sqrt(2.0)


def blur(x, pad: int):
  """[1, 3, 3, 1] x [1, 3, 3, 1] / 64 FIR low-pass filter, per channel.

  x: [B, H, W, C] -> [B, H + 2 pad - 3, W + 2 pad - 3, C]. Written as two
  separable passes of shifted adds: grouped convolutions (and their second
  derivatives, needed by R1) are very slow on CPU.
  """
  taps = np.array([1.0, 3.0, 3.0, 1.0], np.float32) / 8.0
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  h = x.shape[1] - 3
  x = sum(float(t) * x[:, i:i + h] for i, t in enumerate(taps))
  w = x.shape[2] - 3
  return sum(float(t) * x[:, :, i:i + w] for i, t in enumerate(taps))


def minibatch_stddev(x, group_size: int = 4):
  """Appends the group-wise feature std as one extra channel.

  x: [B, H, W, C] -> [B, H, W, C + 1]. Groups are strided over the batch
  ([G, B/G] as in StyleGAN2); the group size is the largest divisor of B that
  is <= group_size.
  """
  b, h, w, c = x.shape
  g = max(d for d in range(1, min(group_size, b) + 1) if b % d == 0)
  y = x.astype(jnp.float32).reshape(g, b // g, h, w, c)
  y = jnp.sqrt(jnp.var(y, axis=0) + 1e-8)  # [B/G, H, W, C]
  y = jnp.mean(y, axis=(1, 2, 3))  # [B/G]
  y = jnp.tile(y, (g,))[:, None, None, None]  # [B, 1, 1, 1]
  y = jnp.broadcast_to(y, (b, h, w, 1)).astype(x.dtype)
  return jnp.concatenate([x, y], axis=-1)


def _conv(features, kernel, name, dtype, param_dtype, strides=1,
          padding="SAME", use_bias=True):
  return conv(features, kernel, name, dtype=dtype, param_dtype=param_dtype,
              strides=strides, padding=padding, use_bias=use_bias)


class ResidualDownBlock(nn.Module):
  """[B, H, W, C_in] -> [B, H/2, W/2, C_out] (StyleGAN2 residual D block)."""
  features: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = leaky_relu(_conv(x.shape[-1], 3, "conv0", **kw)(x))
    h = blur(h, pad=2)  # [B, H+1, W+1, C]
    h = leaky_relu(_conv(self.features, 3, "conv1", strides=2,
                         padding="VALID", **kw)(h))  # [B, H/2, W/2, C_out]
    skip = blur(x, pad=1)  # [B, H-1, W-1, C]
    skip = _conv(self.features, 1, "skip", strides=2, padding="VALID",
                 use_bias=False, **kw)(skip)
    return (h + skip) / math.sqrt(2.0)


class StyleGANDiscriminator(nn.Module):
  """Residual StyleGAN2 discriminator sized from image_size.

  Width at resolution r: min(max_channels, channel_multiplier *
  image_size // r), i.e. channel_multiplier channels at full resolution,
  doubling with every halving, capped at max_channels.
  """
  image_size: int
  channel_multiplier: int = 32
  max_channels: int = 512
  mbstd_group_size: int = 4
  dtype: str = "float32"
  param_dtype: str = "float32"

  def channels(self, resolution: int) -> int:
    return min(self.max_channels,
               self.channel_multiplier * self.image_size // resolution)

  @nn.compact
  def __call__(self, images):  # [B, H, W, C] float, roughly [-1, 1]
    s = self.image_size
    if s < 8 or s & (s - 1):
      raise ValueError(
          f"StyleGANDiscriminator needs a power-of-two image_size >= 8, got "
          f"{s} (set config.data.image_size / config.model.image_size).")
    if images.shape[1:3] != (s, s):
      raise ValueError(f"discriminator got images {images.shape}; expected "
                       f"[B, {s}, {s}, C].")
    x = images.astype(jnp.dtype(self.dtype))
    x = leaky_relu(_conv(self.channels(s), 1, "from_rgb", self.dtype,
                           self.param_dtype)(x))
    res = s
    i = 0
    while res > 4:
      x = ResidualDownBlock(self.channels(res // 2), self.dtype,
                            self.param_dtype, name=f"block{i}")(x)
      res //= 2
      i += 1
    x = minibatch_stddev(x, self.mbstd_group_size)  # [B, 4, 4, C + 1]
    x = leaky_relu(_conv(self.channels(4), 3, "final_conv", self.dtype,
                           self.param_dtype)(x))
    x = x.reshape(x.shape[0], -1)  # [B, 16 C]
    x = leaky_relu(nn.Dense(
        self.channels(4), dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        kernel_init=partitioned(nn.initializers.lecun_normal(),
                                ("conv_in", "conv_out")),
        bias_init=partitioned(nn.initializers.zeros, ("conv_out",)),
        name="final_dense")(x))
    logits = nn.Dense(
        1, dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        kernel_init=partitioned(nn.initializers.lecun_normal(),
                                ("conv_in", None)),
        bias_init=partitioned(nn.initializers.zeros, (None,)),
        name="logits")(x)
    return logits[:, 0].astype(jnp.float32)  # [B]
