"""Parti's super-resolution stage: base-resolution tokens + image -> 2x / 4x.

Parti (Yu et al. 2022, §2.1) trains its ViT-VQGAN at 256x256 and adds a
learned super-resolution module for 512x512 and 1024x1024 outputs, built
from WDSR blocks (Yu et al. 2018, "wide activation"), about 15M parameters
for 2x and 30M for 4x, trained with the tokenizer's losses; the paper says
no more about it. Choices made here, where it is silent:

- Conditioning on both the decoded base image and the image tokens. The
  decoded image carries the layout; the tokens' code vectors (the frozen
  tokenizer's quantizer embedding, the decoder's own input) carry what the
  decoder had to average away, so the upsampler can also undo the
  tokenizer's reconstruction error. Training pairs run the frozen
  tokenizer on the fly (encode -> ids -> decode), so training sees exactly
  what sampling gives it.
- A residual on a bicubic upsampling of the decoded image: at
  initialisation the module is bicubic upsampling (last conv zero-init),
  and it learns the correction.
- WDSR-A blocks at the base resolution (all the compute where pixels are
  fewest), then one conv + pixel shuffle (depth-to-space) per 2x.

  model = Upsampler(factor=4, width=32, expansion=4, num_blocks=4, ...)
  out = model.apply({"params": p}, base01, code_features)
  # base01: float [B, h, w, 3] in [0, 1]; code_features: [B, gh, gw, D]
  # out: float32 [B, h*factor, w*factor, 3] (mu; with log_scale when
  #      predict_scale, for the logit-Laplace loss)
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.nn import layers

FACTORS = (2, 4)
# name -> (width, expansion, num_blocks). "tiny" trains on 2 CPU cores in
# minutes (32 -> 128 on shapes); the paper rows are for 256 -> 512 and
# 256 -> 1024 (about 15M and 30M parameters, Parti §2.1).
SIZES = {
    "tiny": (32, 4, 4),
    "small": (64, 4, 8),
    "paper_x2": (128, 6, 8),
    "paper_x4": (160, 6, 10),
}


def upsampler_config(size: str, factor: int, **overrides) -> dict:
  """Upsampler(**upsampler_config(...)) fields for a row of SIZES."""
  if size not in SIZES:
    raise ValueError(f"Unknown upsampler size {size!r}; expected one of "
                     f"{sorted(SIZES)} (config arg size=...).")
  check_factor(factor)
  width, expansion, blocks = SIZES[size]
  return dict(dict(factor=factor, width=width, expansion=expansion,
                   num_blocks=blocks), **overrides)


def check_factor(factor: int) -> int:
  if factor not in FACTORS:
    raise ValueError(f"Upsampling factor {factor!r} is not supported; "
                     f"expected one of {FACTORS} (config arg factor=...).")
  return factor


class WdsrBlock(nn.Module):
  """WDSR-A: x + conv(relu(conv_wide(x))), the activation `expansion`x wide."""
  width: int
  expansion: int
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, x):  # [B, H, W, width]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.conv(self.width * self.expansion, 3, "wide", **kw)(x)
    h = layers.conv(self.width, 3, "narrow", **kw)(nn.relu(h))
    return x + h


def pixel_shuffle(x, r: int):
  """[B, H, W, C*r*r] -> [B, H*r, W*r, C] (depth to space)."""
  b, h, w, c = x.shape
  x = x.reshape(b, h, w, r, r, c // (r * r))
  return x.transpose(0, 1, 3, 2, 4, 5).reshape(b, h * r, w * r, c // (r * r))


def bicubic(images, factor: int):
  """[B, h, w, C] -> [B, h*f, w*f, C], bicubic (no antialias when upsampling)."""
  b, h, w, c = images.shape
  return jax.image.resize(images, (b, h * factor, w * factor, c), "bicubic")


class Upsampler(nn.Module):
  """Decoded base image (+ its code vectors) -> image at `factor`x."""
  factor: int
  width: int
  expansion: int
  num_blocks: int
  use_codes: bool = True
  predict_scale: bool = False
  dtype: str = "float32"
  param_dtype: str = "float32"

  @nn.compact
  def __call__(self, base, code_features=None):
    """base: float [B, h, w, 3] in [0, 1]; code_features [B, gh, gw, D].

    Returns mu [B, h*f, w*f, 3] in (logit-Laplace) [0, 1] pixel units, and
    log_scale of the same shape when predict_scale (else None).
    """
    check_factor(self.factor)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b, h, w, _ = base.shape
    x = layers.conv(self.width, 3, "stem", **kw)(base * 2.0 - 1.0)  # [B,h,w,W]
    if self.use_codes:
      if code_features is None:
        raise ValueError("Upsampler(use_codes=True) needs code_features.")
      _, gh, gw, _ = code_features.shape
      if h % gh or w % gw:
        raise ValueError(f"The token grid {gh}x{gw} does not divide the base "
                         f"image {h}x{w}.")
      codes = layers.dense(self.width, ("embed", "mlp"), use_bias=True,
                           name="codes", **kw)(code_features)  # [B, gh, gw, W]
      codes = jnp.repeat(jnp.repeat(codes, h // gh, axis=1), w // gw, axis=2)
      x = x + codes
    x = layers.constrain(x, ("act_batch", None, None, "act_embed"))
    skip = x
    for i in range(self.num_blocks):
      x = WdsrBlock(self.width, self.expansion, name=f"block_{i}", **kw)(x)
    x = x + skip
    for i in range(self.factor // 2):  # 2x per stage
      x = pixel_shuffle(layers.conv(4 * self.width, 3, f"up_{i}", **kw)(x), 2)
      x = nn.relu(x) if i + 1 < self.factor // 2 else x
    out_channels = 6 if self.predict_scale else 3
    # Zero-initialised: the module starts as bicubic upsampling.
    residual = layers.conv(out_channels, 3, "head",
                           kernel_init=nn.initializers.zeros, **kw)(x)
    residual = residual.astype(jnp.float32)  # [B, H, W, 3 or 6]
    upsampled = bicubic(base.astype(jnp.float32), self.factor)
    mu = upsampled + residual[..., :3]
    log_scale = residual[..., 3:] if self.predict_scale else None
    return mu, log_scale
