"""Host memory: keep freed heap memory for reuse instead of returning it.

XLA:CPU allocates each executable's temporary buffer (about 400 MB for the
demo's Parti step) with posix_memalign on every call and frees it when the
call ends. glibc serves blocks over 32 MB with mmap and gives them back with
munmap, and a worker thread's arena falls back to mmap for any block larger
than its 64 MB heap, so every training step re-faulted every page of that
buffer: about 100,000 page faults a step, a third of the CPU time in the
kernel, measured on 2 cores (README, "Host memory").

keep_freed_memory() sets three glibc options (mallopt) for the process:
one arena (worker threads allocate from the main heap), no mmap for large
blocks, and no trimming of the heap's top, so a freed buffer stays mapped
and the next step reuses it. (A 2 GiB trim threshold was not enough: the
interleaved model's step frees about 3 GB at once, and glibc gave it back
and faulted it in again every step.) The cost: the process keeps its peak
heap instead of returning it to the system.

It must run before JAX starts its CPU backend (the backend's threads pick
their arena on their first allocation); the entry points (unimm.main, the
data CLIs, benchmarks, the test suite) call it first. Set
UNIMM_KEEP_HOST_MEMORY=0 to leave malloc as it is. Elsewhere than glibc
(macOS, musl) it does nothing.
"""
import ctypes
import os
import platform

from absl import logging

ENV_VAR = "UNIMM_KEEP_HOST_MEMORY"

# From glibc's malloc.h.
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_NEVER = -1  # M_TRIM_THRESHOLD -1: never trim (man mallopt)


def keep_freed_memory() -> bool:
  """Makes glibc keep freed memory for reuse; True if the options were set."""
  if os.environ.get(ENV_VAR, "1") == "0":
    return False
  if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
    return False
  libc = ctypes.CDLL(None)
  options = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0),
             (_M_TRIM_THRESHOLD, _NEVER))
  applied = all(libc.mallopt(option, value) == 1 for option, value in options)
  if not applied:
    logging.warning("mallopt refused the host-memory options; freed memory "
                    "is returned to the system as usual (slower on CPU).")
  return applied
