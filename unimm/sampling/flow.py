"""Sampling a flow-matching model: Euler steps of its velocity field, one
lax.scan, with classifier-free guidance.

The convention (rectified flow, Liu et al. 2022; Lipman et al. 2022; SD3):
x_t = (1 - t) x_0 + t noise, t in [0, 1], and the model predicts the
velocity v = noise - x_0 = dx_t/dt. Sampling starts at t = 1 from pure
noise and steps to t = 0 on a uniform grid:

  x_{t_next} = x_t + (t_next - t) v(x_t, t)

  images = euler_sample(velocity_fn, noise, num_steps)   # x at t = 0

velocity_fn(x [B, ...], t [B]) -> v [B, ...]; classifier-free guidance
(Ho & Salimans 2022) combines a conditional and an unconditional velocity
inside it as the token samplers combine logits
(unimm.sampling.sampler.guided_logits).
"""
from typing import Callable

import jax
import jax.numpy as jnp

VelocityFn = Callable[[jax.Array, jax.Array], jax.Array]


def check_steps(num_steps) -> int:
  """num_steps as an int; ValueError unless it is a positive int."""
  if (isinstance(num_steps, bool) or not isinstance(num_steps, int)
      or num_steps < 1):
    raise ValueError(f"num_steps={num_steps!r}; expected an int >= 1 (the "
                     "Euler steps from noise to image, e.g. 32).")
  return num_steps


def time_grid(num_steps: int) -> jax.Array:
  """float32 [num_steps + 1]: 1, ..., 0 evenly spaced."""
  return jnp.linspace(1.0, 0.0, check_steps(num_steps) + 1,
                      dtype=jnp.float32)


def euler_step(velocity_fn: VelocityFn, x, t, t_next):
  """One Euler step from time t to t_next (scalars) for the whole batch."""
  v = velocity_fn(x, jnp.full((x.shape[0],), t, jnp.float32))
  return x + (t_next - t) * v.astype(x.dtype)


def euler_sample(velocity_fn: VelocityFn, noise, num_steps: int):
  """x at t = 0 from x at t = 1 (noise), by num_steps Euler steps in one
  lax.scan (one compiled step, whatever num_steps)."""
  times = time_grid(num_steps)

  def body(x, step_times):
    t, t_next = step_times
    return euler_step(velocity_fn, x, t, t_next), None

  x, _ = jax.lax.scan(body, noise, (times[:-1], times[1:]))
  return x
