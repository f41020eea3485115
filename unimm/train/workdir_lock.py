"""One run per workdir: a lock file taken at start and released at exit.

Two runs on one workdir (the same command twice, or a second run with
another seed) would interleave their checkpoints, reports and metrics
without an error. `hold(workdir)` creates workdir/LOCK atomically
(O_CREAT | O_EXCL) with the host, pid and start time of the run; a second
run fails at once, naming the first. A lock left by a process that no
longer runs on this host (killed with -9, a crash) is stale: it is taken
over with a warning. A lock from another host cannot be checked from here:
the error says how to remove it if that run is gone.

A workdir on another filesystem (gs://...) gets the same lock through
etils.epath, except that its creation is a check then a write: object
stores offer no O_EXCL, so two runs started within that gap both proceed.
"""
import contextlib
import datetime
import json
import os
import socket

from absl import logging
from etils import epath
import jax

from unimm import paths

LOCK_FILE = "LOCK"


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # a process of another user: it exists
    return True
  return True


def _read(path: str) -> dict:
  try:
    return json.loads(epath.Path(path).read_text())
  except (OSError, ValueError):
    return {}  # being written, or garbage: treated as held below


def _create(path: str, record: dict) -> bool:
  if paths.is_uri(path):
    lock = epath.Path(path)
    if lock.exists():
      return False
    lock.write_text(json.dumps(record))
    return True
  try:
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
  except FileExistsError:
    return False
  with os.fdopen(fd, "w") as f:
    json.dump(record, f)
  return True


def acquire(workdir: str) -> str:
  """Takes workdir's lock (see the module doc); returns its path."""
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  record = {"host": socket.gethostname(), "pid": os.getpid(),
            "started": datetime.datetime.now().isoformat(timespec="seconds")}
  for _ in range(3):
    if _create(path, record):
      return path
    held = _read(path)
    same_host = held.get("host") == record["host"]
    pid = held.get("pid")
    if same_host and isinstance(pid, int) and pid == os.getpid():
      raise RuntimeError(f"This process already holds {path}.")
    if same_host and isinstance(pid, int) and not _alive(pid):
      logging.warning("Taking over the stale lock %s of process %d (started "
                      "%s), which no longer runs.", path, pid,
                      held.get("started", "?"))
      epath.Path(path).unlink(missing_ok=True)
      continue
    raise RuntimeError(
        f"{workdir!r} is in use by another run: process {pid} on host "
        f"{held.get('host', '?')!r}, started {held.get('started', '?')} "
        f"({path}). Wait for it to finish, stop it, or use another "
        f"--workdir; if that run is gone (another host), delete {path}.")
  raise RuntimeError(f"Could not take the lock {path}; retry.")


def release(path: str) -> None:
  """Removes the lock if this process holds it."""
  held = _read(path)
  if held.get("pid") == os.getpid() and held.get(
      "host") == socket.gethostname():
    epath.Path(path).unlink(missing_ok=True)


@contextlib.contextmanager
def hold(workdir: str):
  """The lock of `workdir` for the duration of the block (process 0 takes
  it for all hosts of a multi-host run)."""
  if jax.process_index() != 0:
    yield None
    return
  path = acquire(workdir)
  try:
    yield path
  finally:
    release(path)
