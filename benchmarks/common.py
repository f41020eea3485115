"""Shared measurement helpers for the benchmarks (run from the repo root)."""
import time

import jax
import jax.numpy as jnp


def timed(fn, *args, repeats: int = 5, warmup: int = 1):
  """Best wall time of fn(*args) (blocking on the result), in seconds."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def matmul_peak_flops(n: int = 2048, dtype=jnp.float32) -> float:
  """This machine's measured f32 matmul FLOP/s (the denominator of MFU)."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  matmul = jax.jit(jnp.dot)
  return 2 * n ** 3 / timed(matmul, a, b, repeats=10)


def compiled_flops(compiled) -> float:
  """FLOPs XLA counts for one call of a compiled function."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", 0.0))
