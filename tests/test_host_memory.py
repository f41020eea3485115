"""keep_freed_memory: XLA's large buffers are reused instead of re-faulted."""
import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from unimm import host_memory

# Runs in a fresh process (malloc options are process-wide and the test
# process has them set by conftest): one jitted call whose 96 MB output is
# allocated by XLA:CPU and freed again, repeated; prints the minor page
# faults of each call after warm-up calls. XLA frees a buffer a little after
# its last use, so the heap first grows to hold a few of them (measured
# here: it stops growing within 6 calls when the machine is quiet, later
# when it is busy), and a call that extends the heap still faults.
_PROBE = textwrap.dedent("""
    import json, resource
    from unimm import host_memory
    applied = host_memory.keep_freed_memory()
    import jax, jax.numpy as jnp
    x = jnp.ones((24 * 2**20,), jnp.float32)  # 96 MB
    f = jax.jit(lambda v: v * 2.0 + 1.0)
    for _ in range(8):  # compile; the heap reaches its size
      f(x).block_until_ready()
    faults = []
    for _ in range(10):
      before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
      y = f(x)
      y.block_until_ready()
      del y
      faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    print(json.dumps({"applied": applied, "faults": faults}))
""")


def _faults(keep: str) -> dict:
  env = dict(os.environ, **{host_memory.ENV_VAR: keep})
  out = subprocess.run([sys.executable, "-c", _PROBE], env=env, check=True,
                       capture_output=True, text=True, timeout=300).stdout
  return json.loads(out.strip().splitlines()[-1])


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc",
                    reason="the options are glibc's")
def test_freed_buffers_are_reused_not_refaulted():
  default = _faults("0")
  kept = _faults("1")
  assert not default["applied"] and kept["applied"]
  # 96 MB is 24,576 pages of 4 KiB: without the options glibc maps a new
  # block for every call and each page faults again ...
  assert min(default["faults"]) > 20_000, default
  # ... with them a call that reuses a freed block faults (almost) nothing.
  assert min(kept["faults"]) < 0.1 * min(default["faults"]), (default, kept)
  assert sum(kept["faults"]) < sum(default["faults"]), (default, kept)
