"""unimm: autoregressive text-to-image and interleaved text+image in JAX/Flax.

Public API (unimm.api): unimm.load_tokenizer(path), unimm.load_model(path),
unimm.load_upsampler(path), unimm.load_detokenizer(path), where path is a training workdir or a folder
written by `python -m unimm.export`; unimm.data.shapes (the embedded world);
unimm.evaluation.grids (PNG grids).

The loaders are imported on first use (PEP 562), so a program that
only needs a submodule (a converter worker process, a tool's --help) does
not pay for JAX, Flax and orbax.
"""
import importlib

__version__ = "0.1.0"

_API = ("load_detokenizer", "load_model", "load_tokenizer",
        "load_upsampler")


def __getattr__(name: str):
  if name in _API:
    return getattr(importlib.import_module("unimm.api"), name)
  raise AttributeError(f"module 'unimm' has no attribute {name!r}")


def __dir__():
  return sorted([*globals(), *_API])
