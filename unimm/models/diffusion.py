"""A diffusion de-tokenizer: images decoded from a sequence of conditioning
embeddings by a small DiT trained with flow matching.

SEED-X, NExT-GPT, CoDi-2 and Emu turn what a language model writes
(visual embeddings, output queries) into pixels with a diffusion model
conditioned on that sequence. Here the decoder is a DiT (Peebles & Xie
2023) on the shared transformer stack: the noisy image's patches
(PatchEmbed, 2-D sine-cosine positions) attend to themselves and, by
cross-attention, to the condition (projected to the width, with learned
positions, plus the same 2-D positions when it is a square grid) and a
time token; the time embedding is also added to every
patch. A linear head maps each patch back to pixels (PatchUnembed).

Objective: flow matching with straight paths (rectified flow; Liu et al.
2022, Lipman et al. 2022, as SD3): x_t = (1 - t) x_0 + t noise, velocity
v = noise - x_0, loss = mean (v_pred - v)^2 with t ~ U(0, 1). Chosen over
epsilon / v prediction with a noise schedule because it has no schedule to
tune and its near-straight paths decode well with few Euler steps, which
matters on CPU. The network predicts the clean image x_0 and the velocity
is (x_t - x_0_pred) / t (t at least T_MIN), the x-prediction of Li & He
2025 ("Back to basics: let denoising generative models denoise"): a narrow
network that must output v has to carry the noise through its bottleneck
(a patch of 4x4x3 values into a width of 64), and on shapes that left it
below the mean image at t = 1; x_0 lies on the data, and the noise reaches
v exactly through x_t. Sampling is unimm.sampling.flow (Euler, one
lax.scan).

Classifier-free guidance: `use_condition` False replaces the condition by a
learned null sequence; training drops the condition at a rate
(condition_drop_rate), sampling mixes the two velocities. An optional
source image (SEED-X's editing decoder) is concatenated to the noisy
image's channels.

  model = DiffusionDecoder(**diffusion_config("tiny", image_size=32,
                                              condition_length=64,
                                              condition_dim=32))
  loss = flow_matching_loss(model, params, images01, condition, rng)
  images01 = sample(model, params, condition, rng, num_steps=32,
                    cfg_scale=2.0)
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from unimm.nn import layers
from unimm.nn.transformer import TransformerStack
from unimm.sampling import flow
from unimm.sampling import sampler as sampler_lib

# name -> (embed_dim, num_layers, num_heads, mlp_dim, patch_size). "tiny"
# trains on 2 CPU cores in minutes on 32-pixel shapes; "paper" is DiT-XL/2
# (Peebles & Xie 2023, 675M parameters), for the planner.
SIZES = {
    "tiny": (64, 2, 4, 128, 4),
    "small": (128, 4, 4, 256, 4),
    "paper": (1152, 28, 16, 4608, 2),
}


def diffusion_config(size: str, **overrides) -> dict:
  """DiffusionDecoder(**diffusion_config(...)) fields for a row of SIZES."""
  if size not in SIZES:
    raise ValueError(f"Unknown diffusion decoder size {size!r}; expected one "
                     f"of {sorted(SIZES)} (config arg size=...).")
  width, depth, heads, mlp, patch = SIZES[size]
  return dict(dict(embed_dim=width, num_layers=depth, num_heads=heads,
                   head_dim=width // heads, mlp_dim=mlp, patch_size=patch),
              **overrides)


def timestep_embedding(t, dim: int, max_period: float = 10_000.0):
  """Sinusoidal embedding [B, dim] of times t [B] in [0, 1] (scaled by
  1000, as DDPM's integer steps)."""
  half = dim // 2
  freqs = jnp.exp(-jnp.log(max_period) * jnp.arange(half) / half)
  args = 1000.0 * t[:, None].astype(jnp.float32) * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


class DiffusionDecoder(nn.Module):
  """Velocity of the noisy image x_t given the condition (module doc)."""
  image_size: int
  condition_length: int
  condition_dim: int
  embed_dim: int
  num_layers: int
  num_heads: int
  head_dim: int
  mlp_dim: int
  patch_size: int = 4
  channels: int = 3
  source_image: bool = False
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: str = "float32"
  param_dtype: str = "float32"

  @property
  def grid(self) -> tuple[int, int]:
    side = self.image_size // self.patch_size
    return side, side

  def check_inputs(self, x_t, condition, source=None) -> None:
    """ValueError naming what is wrong with the inputs' shapes (static)."""
    s, c = self.image_size, self.channels
    if self.image_size % self.patch_size:
      raise ValueError(
          f"patch_size={self.patch_size} does not divide image_size="
          f"{self.image_size}; set config.model.patch_size to a divisor.")
    if x_t.ndim != 4 or tuple(x_t.shape[1:]) != (s, s, c):
      raise ValueError(f"Images of shape {tuple(x_t.shape)}; expected "
                       f"[B, {s}, {s}, {c}] (config.model.image_size).")
    k, d = self.condition_length, self.condition_dim
    if (condition.ndim != 3 or tuple(condition.shape[1:]) != (k, d)
        or condition.shape[0] != x_t.shape[0]):
      raise ValueError(
          f"A condition of shape {tuple(condition.shape)}; expected "
          f"[{x_t.shape[0]}, {k}, {d}] (config.model.condition_length / "
          "condition_dim: the sequence the decoder was trained on).")
    if source is not None and not self.source_image:
      raise ValueError(
          "This decoder has no source image (config.model.source_image="
          "False); drop source=, or train one with config arg source=1.")
    if source is not None and tuple(source.shape) != tuple(x_t.shape):
      raise ValueError(f"A source image of shape {tuple(source.shape)}; "
                       f"expected {tuple(x_t.shape)}, as the images.")

  @nn.compact
  def __call__(self, x_t, t, condition, use_condition=None, source=None):
    """x_t [B, S, S, C] in the data range [-1, 1] (noised); t [B] in [0,
    1]; condition [B, K, D_c]; use_condition bool [B] (default all True;
    False: the learned null condition); source [B, S, S, C] in [-1, 1]
    when source_image (None there: no source, a zero image, as the
    training's dropped sources). Returns the clean image estimate x_0 in [-1, 1]
    units, float32 [B, S, S, C] (`velocity` turns it into v)."""
    self.check_inputs(x_t, condition, source)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    b = x_t.shape[0]
    if self.source_image:
      x = jnp.concatenate([x_t, jnp.zeros_like(x_t) if source is None
                           else source.astype(x_t.dtype)], axis=-1)
    else:
      x = x_t
    h = layers.PatchEmbed(self.patch_size, self.embed_dim, name="patch_embed",
                          **kw)(x)
    gh, gw = self.grid
    h = h + layers.sincos_positions_2d(gh, gw, self.embed_dim)[None].astype(
        h.dtype)
    temb = timestep_embedding(t, self.embed_dim)
    temb = layers.dense(self.embed_dim, ("embed", "mlp"), use_bias=True,
                        name="time_in", **kw)(temb)
    temb = layers.dense(self.embed_dim, ("mlp", "embed"), use_bias=True,
                        name="time_out", **kw)(nn.silu(temb))  # [B, D]
    h = h + temb[:, None].astype(h.dtype)
    memory = layers.dense(self.embed_dim, (None, "embed"), use_bias=True,
                          name="condition_in", **kw)(
                              condition.astype(jnp.float32))
    memory = layers.LearnedPositions(self.condition_length, self.embed_dim,
                                     param_dtype=self.param_dtype,
                                     name="condition_positions")(memory)
    side = math.isqrt(self.condition_length)
    if side * side == self.condition_length:
      # A square condition (a tokenizer's grid of codes or encoder tokens)
      # also gets the patches' 2-D positions, so a patch finds its own
      # place in it at once (a grid of the patches' size lines up exactly).
      memory = memory + layers.sincos_positions_2d(
          side, side, self.embed_dim)[None].astype(memory.dtype)
    null = self.param("null_condition",
                      layers.partitioned(nn.initializers.normal(0.02),
                                         (None, "embed")),
                      (self.condition_length, self.embed_dim),
                      jnp.dtype(self.param_dtype))
    if use_condition is None:
      use_condition = jnp.ones((b,), bool)
    memory = jnp.where(jnp.asarray(use_condition, bool)[:, None, None],
                       memory, null[None].astype(memory.dtype))
    memory = jnp.concatenate([temb[:, None].astype(memory.dtype), memory], 1)
    h = TransformerStack(
        num_layers=self.num_layers, embed_dim=self.embed_dim,
        num_heads=self.num_heads, num_kv_heads=self.num_heads,
        head_dim=self.head_dim, mlp_dim=self.mlp_dim, causal=False,
        cross_attention=True, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, name="transformer", **kw)(
            h, encoded=memory)
    v = layers.PatchUnembed(self.patch_size, self.channels,
                            name="patch_unembed", **kw)(h, self.grid)
    return v.astype(jnp.float32)


# The smallest t the velocity divides by (x-prediction, module doc).
T_MIN = 0.05


def velocity(model: DiffusionDecoder, params, x_t, t, condition,
             use_condition=None, source=None):
  """v = (x_t - x_0_pred) / max(t, T_MIN): the velocity of the decoder's
  clean-image estimate (float32 [B, S, S, C])."""
  x0 = model.apply({"params": params}, x_t, t, condition, use_condition,
                   source)
  return (x_t - x0) / jnp.maximum(t, T_MIN)[:, None, None, None]


def to_data(images01):
  """Pixels in [0, 1] -> the data range [-1, 1]."""
  return images01.astype(jnp.float32) * 2.0 - 1.0


LOSS_TARGETS = ("x", "v")


def flow_matching_loss(model: DiffusionDecoder, params, images01, condition,
                       rng, *, condition_drop_rate: float = 0.0,
                       source01=None, source_drop_rate: float = 0.0,
                       target: str = "x", weights=None):
  """Mean squared error on images [B, S, S, C] in [0, 1] of the clean-image
  estimate (target "x") or of the velocity it gives (target "v": the same
  error weighted by 1 / t^2, which puts nearly all the weight on small t,
  where denoising is local and the condition barely matters); the
  condition is dropped (null) for a condition_drop_rate share of the
  batch; source01 [B, S, S, C] in [0, 1] (a source_image decoder's
  sources) is dropped (a zero image: no source) for a source_drop_rate
  share, so the decoder also draws from the condition alone; weights [B]
  weigh the images (default: alike). Returns (loss, metrics)."""
  if target not in LOSS_TARGETS:
    raise ValueError(f"target={target!r}; expected one of {LOSS_TARGETS} "
                     "(config.loss.target).")
  x0 = to_data(images01)
  t_rng, noise_rng, drop_rng, source_rng = jax.random.split(rng, 4)
  b = x0.shape[0]
  t = jax.random.uniform(t_rng, (b,))
  noise = jax.random.normal(noise_rng, x0.shape)
  x_t = (1.0 - t)[:, None, None, None] * x0 + t[:, None, None, None] * noise
  use = jax.random.uniform(drop_rng, (b,)) >= condition_drop_rate
  source = None if source01 is None else to_data(source01)
  if source is not None and source_drop_rate:
    keep = jax.random.uniform(source_rng, (b,)) >= source_drop_rate
    source = jnp.where(keep[:, None, None, None], source, 0.0)
  x0_pred = model.apply({"params": params}, x_t, t, condition, use, source)
  if target == "x":
    error = (x0_pred - x0) ** 2
  else:  # the velocity's error: the same error weighted by 1 / t^2
    t_div = jnp.maximum(t, T_MIN)[:, None, None, None]
    error = ((x_t - x0_pred) / t_div - (noise - x0)) ** 2
  if weights is None:
    loss = jnp.mean(error)
  else:
    per_image = jnp.mean(error, axis=(1, 2, 3))
    loss = jnp.sum(weights * per_image) / jnp.maximum(jnp.sum(weights),
                                                      1e-6)
  return loss, {"flow_loss": loss}


def sample(model: DiffusionDecoder, params, condition, rng, *,
           num_steps: int, cfg_scale=None, source01=None):
  """Images float32 [B, S, S, C] in [0, 1] decoded from condition [B, K,
  D_c] by num_steps Euler steps (one lax.scan); cfg_scale: None for the
  conditional model alone, else classifier-free guidance at that scale
  (each step evaluates the conditional and null branches in one batch)."""
  flow.check_steps(num_steps)
  b, s, c = condition.shape[0], model.image_size, model.channels
  noise = jax.random.normal(rng, (b, s, s, c))
  model.check_inputs(noise, condition,
                     None if source01 is None else to_data(source01))
  source = None if source01 is None else to_data(source01)

  def guided_velocity(x, t):
    if cfg_scale is None:
      return velocity(model, params, x, t, condition, None, source)
    both = velocity(
        model, params, jnp.concatenate([x, x]), jnp.concatenate([t, t]),
        jnp.concatenate([condition, condition]),
        jnp.concatenate([jnp.ones((b,), bool), jnp.zeros((b,), bool)]),
        None if source is None else jnp.concatenate([source, source]))
    return sampler_lib.guided_logits(both, cfg_scale)  # [cond; null]

  x = flow.euler_sample(guided_velocity, noise, num_steps)
  return jnp.clip((x + 1.0) / 2.0, 0.0, 1.0)
