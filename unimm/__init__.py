"""unimm: autoregressive text-to-image and interleaved text+image in JAX/Flax.

Public API (unimm.api): unimm.load_tokenizer(path), unimm.load_model(path),
unimm.load_upsampler(path), where path is a training workdir or a folder
written by `python -m unimm.export`; unimm.data.shapes (the embedded world);
unimm.evaluation.grids (PNG grids).
"""
__version__ = "0.1.0"

# pylint: disable=g-import-not-at-top,wrong-import-position
from unimm.api import load_model
from unimm.api import load_tokenizer
from unimm.api import load_upsampler
