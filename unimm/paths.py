"""Paths that may name another filesystem (gs://bucket/..., s3://...).

Data sets, workdirs, tokenizers and exports are read and written through
`etils.epath`, which serves local paths with `os` and URIs with
tf.io.gfile or fsspec. `os.path.abspath` and `os.path.normpath` would turn
"gs://b/x" into "<cwd>/gs:/b/x"; the functions here keep the scheme.
"""
import os
import posixpath

from etils import epath


def is_uri(path: epath.PathLike) -> bool:
  """Whether `path` names another filesystem ("gs://b/x"), not a local one."""
  return "://" in os.fspath(path)


def absolute(path: epath.PathLike) -> str:
  """os.path.abspath for a local path; a URI as it is."""
  path = os.fspath(path)
  return path if is_uri(path) else os.path.abspath(path)


def normalized(path: epath.PathLike) -> str:
  """os.path.normpath for a local path; a URI with its path part normalized
  ("gs://b/x/../y" -> "gs://b/y")."""
  path = os.fspath(path)
  if not is_uri(path):
    return os.path.normpath(path)
  scheme, rest = path.split("://", 1)
  return f"{scheme}://{posixpath.normpath(rest)}"
