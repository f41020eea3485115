"""Errors the stack turns into one clear message: a full disk.

A write that fails for want of space surfaces in many forms: an OSError
with errno ENOSPC from Python, or a ValueError from TensorStore (orbax's
checkpoint writer: "RESOURCE_EXHAUSTED: ... No space left on device
[os_error_code='28']"), often chained under other exceptions raised while
stopping. `disk_full` finds it anywhere in the chain.
"""
import errno
import os
import re

_NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"
_TENSORSTORE_PATH = re.compile(r'Failed (?:writing|to write)[^"]*"([^"]+)"')


class DiskFullError(OSError):
  """No space left where a run writes; the message says where and what to
  do. Its errno is ENOSPC and its filename the path that failed."""

  def __init__(self, message: str, path: str):
    super().__init__(errno.ENOSPC, message, path)
    self.message = message

  def __str__(self):
    return self.message


def _chain(error: BaseException):
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def disk_full(error: BaseException) -> str | None:
  """The path a write ran out of space on (or "" if not known), if `error`
  or any exception it was raised from is a full disk; else None."""
  for cause in _chain(error):
    if isinstance(cause, OSError) and cause.errno == errno.ENOSPC:
      return str(cause.filename or "")
    text = str(cause)
    if _NO_SPACE in text or "os_error_code='28'" in text:
      found = _TENSORSTORE_PATH.search(text)
      return found.group(1) if found else ""
  return None
