"""unimm: autoregressive text-to-image and interleaved text+image in JAX/Flax.

Public API: unimm.load_tokenizer(workdir), unimm.load_model(workdir),
unimm.load_upsampler(workdir); unimm.data.shapes.
"""
__version__ = "0.1.0"


def load_tokenizer(workdir: str, step: int | None = None):
  """The ViT-VQGAN trained in `workdir`; see unimm.api.Tokenizer."""
  from unimm import api  # pylint: disable=g-import-not-at-top
  return api.load_tokenizer(workdir, step)


def load_model(workdir: str, step: int | None = None, *, upsamplers=None):
  """The text-to-image model trained in `workdir`; see unimm.api."""
  from unimm import api  # pylint: disable=g-import-not-at-top
  return api.load_model(workdir, step, upsamplers=upsamplers)


def load_upsampler(workdir: str, step: int | None = None):
  """The super-resolution module trained in `workdir`; see unimm.api."""
  from unimm import api  # pylint: disable=g-import-not-at-top
  return api.load_upsampler(workdir, step)
