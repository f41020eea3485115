"""The one writer of evaluation reports (and other small JSON records).

Evaluators return plain values; `write_report` saves them: numpy scalars
and arrays become JSON numbers and lists, the file is written by process 0
only, and atomically (a temporary file in the same directory, then a
rename), so a reader never sees half a report and a failed write leaves
the previous one intact. Paths go through etils.epath: a report may live
on gs://. `write_json` is the same write without the
process check, for single-process tools that never start jax (asking jax
for the process index starts its backend).
"""
import json
import os
import uuid
from collections.abc import Mapping
from typing import Any

from etils import epath
import jax
import numpy as np


def to_json(value: Any) -> Any:
  """`value` with numpy types as JSON types: scalars as int / float / bool,
  arrays as (nested) lists, mappings as dicts with str keys, tuples and
  sets as lists. NaN and inf stay floats (json writes NaN / Infinity)."""
  if isinstance(value, Mapping):
    return {str(k): to_json(v) for k, v in value.items()}
  if isinstance(value, (list, tuple, set, frozenset)):
    return [to_json(v) for v in value]
  if isinstance(value, (np.ndarray, jax.Array)):
    return to_json(np.asarray(value).tolist())
  if isinstance(value, np.generic):
    return to_json(value.item())
  if isinstance(value, (bool, int, float, str)) or value is None:
    return value
  if isinstance(value, bytes):
    return value.decode("utf-8", errors="replace")
  if isinstance(value, os.PathLike):
    return os.fspath(value)
  raise TypeError(f"Cannot write {type(value).__name__} {value!r} to a JSON "
                  "report; convert it to a number, string, list or dict.")


def write_json(path: epath.PathLike, value: Any) -> Any:
  """Writes to_json(value) to `path` atomically, from this process, whatever
  its index (for single-process tools that never start jax); returns it.
  Parent directories are created."""
  converted = to_json(value)
  target = epath.Path(path)
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.{uuid.uuid4().hex[:8]}.tmp"
  try:
    with tmp.open("w") as f:
      json.dump(converted, f, indent=2)
      f.write("\n")
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise
  return converted


def write_report(path: epath.PathLike, report: Mapping[str, Any]) -> dict:
  """Writes `report` as JSON to `path`, on process 0 only, atomically.

  Numpy scalars and arrays become JSON numbers and lists (to_json); parent
  directories are created. Every process returns the converted dict, so
  callers log and return the same values everywhere.
  """
  if jax.process_index() != 0:
    return to_json(report)
  return write_json(path, report)
