"""keep_freed_memory: XLA's large buffers are reused instead of re-faulted."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

# Runs in a fresh process (malloc options are process-wide and the test
# process has them set by conftest): one jitted call whose 96 MB output is
# allocated by XLA:CPU and freed again, repeated; prints minor page faults
# per call after warm-up calls (XLA frees a buffer a little after its last
# use, so the heap first grows to hold a few of them; measured here it
# stops growing within 6 calls).
_PROBE = textwrap.dedent("""
    import json, resource
    from unimm import host_memory
    applied = host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((24 * 2**20,), jnp.float32)  # 96 MB
    f = jax.jit(lambda v: v * 2.0 + 1.0)
    for _ in range(8):  # compile; the heap reaches its size
      f(x).block_until_ready()
    calls = 10
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(calls):
      y = f(x)
      y.block_until_ready()
      del y
    after = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    print(json.dumps({"applied": applied,
                      "faults_per_call": (after - before) / calls}))
""")


def _faults_per_call(keep: str) -> dict:
  env = dict(os.environ, UNIMM_KEEP_HOST_MEMORY=keep)
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="the options are glibc's")
def test_freed_buffers_are_reused_not_refaulted():
  default = _faults_per_call("0")
  kept = _faults_per_call("1")
  assert not default["applied"] and kept["applied"]
  # 96 MB is 24,576 pages of 4 KiB: without the options glibc maps a new
  # block for every call and each page faults again.
  assert default["faults_per_call"] > 10_000, default
  assert kept["faults_per_call"] < 0.3 * default["faults_per_call"], (
      default, kept)
