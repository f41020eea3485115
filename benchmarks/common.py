"""Shared measurement helpers for the benchmarks (run from the repo root)."""
import collections
import glob
import gzip
import json
import os
import re
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


def matmul_instructions(hlo_text: str) -> set[str]:
  """Names of the top-level instructions of an optimized HLO module that
  multiply matrices: dots, convolutions, and fusions (or calls) whose
  computation holds one. XLA:CPU runs each of these as one thunk, which
  is what a profile of the executable names."""
  bodies, name, lines = {}, None, []
  for line in hlo_text.splitlines():
    head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
    if head:
      name, lines = head.group(1), []
    elif line.startswith("}") and name is not None:
      bodies[name] = lines
      name = None
    elif name is not None:
      lines.append(line)

  def has_matmul(computation, seen=()):
    for line in bodies.get(computation, ()):
      if re.search(r"\b(dot|convolution)\(", line):
        return True
      for callee in re.findall(r"(?:calls|to_apply)=%?([\w.\-]+)", line):
        if callee not in seen and has_matmul(callee, seen + (callee,)):
          return True
    return False

  found = set()
  for lines_ in bodies.values():
    for line in lines_:
      assigned = re.match(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", line)
      if not assigned:
        continue
      if re.search(r"\b(dot|convolution)\(", line) or any(
          has_matmul(c) for c in re.findall(r"calls=%?([\w.\-]+)", line)):
        found.add(assigned.group(1))
  return found


def profile_op_seconds(run, trace_dir: str) -> dict[str, float]:
  """Seconds per traced event name (summed over threads) while run() runs
  under jax.profiler (XLA:CPU names one event per executed thunk)."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    run()
  paths = sorted(glob.glob(os.path.join(trace_dir, "**",
                                        "perfetto_trace.json.gz"),
                           recursive=True), key=os.path.getmtime)
  with gzip.open(paths[-1]) as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  seconds = collections.Counter()
  for event in events:
    if event.get("ph") == "X":
      seconds[event["name"]] += event.get("dur", 0.0) * 1e-6
  return dict(seconds)


def time_by_op_class(op_seconds: dict[str, float],
                     hlo_text: str) -> dict[str, dict[str, float]]:
  """Traced seconds of an executable's thunks, {"matmul": {kind: s},
  "other": {kind: s}}; a kind is an instruction name without its number
  (dot_general, ynn_fusion, copy_bitcast_fusion, ...)."""
  names = set(re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = ", hlo_text,
                         re.MULTILINE))
  matmuls = matmul_instructions(hlo_text)
  split = {"matmul": collections.Counter(), "other": collections.Counter()}
  for name, seconds in op_seconds.items():
    if name not in names:
      continue  # host-side events (dispatch, Python)
    kind = re.sub(r"\.\d+$", "", name)
    split["matmul" if name in matmuls else "other"][kind] += seconds
  return {k: dict(v) for k, v in split.items()}
