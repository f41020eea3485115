"""Inference: trained models loaded from a folder, with no training code.

  tokenizer = load_tokenizer(path)     # images <-> ids
  model = load_model(path)             # TextToImageModel | InterleavedModel
  images = model.sample(prompts)       # the eval's sampling settings
  upsampler = load_upsampler(path)     # Parti's super-resolution stage
  detokenizer = load_detokenizer(path) # codes -> images by diffusion

`path` is a training workdir (an end-to-end recipe's workdir loads its
parti/ stage), a folder written by `python -m unimm.export`, or the name
of an exported model that ships in the package (unimm/pretrained/, e.g.
"shapes-parti"; checkpoints.pretrained_names()). Relative
paths a run's config names (its tokenizers) resolve against the folder
first (unimm.checkpoints.resolve_path), so both load from any directory.
"""
import os

from unimm import checkpoints
from unimm.inference.detokenizer import Detokenizer
from unimm.inference.detokenizer import load_detokenizer
from unimm.inference.interleaved import InterleavedModel
from unimm.inference.interleaved import load_interleaved
from unimm.inference.settings import EVAL
from unimm.inference.text_to_image import load_text_to_image
from unimm.inference.text_to_image import TextToImageModel
from unimm.inference.tokenizer import load_tokenizer
from unimm.inference.tokenizer import Tokenizer
from unimm.inference.upsampler import load_upsampler
from unimm.inference.upsampler import Upsampler

# An end-to-end recipe's model stage (unimm.end_to_end: parti/, or
# interleaved/ with model=interleaved).
RECIPE_MODEL_STAGES = ("parti", "interleaved")


def model_path(path: str) -> str:
  """An end-to-end recipe's model stage (parti/ or interleaved/), a
  packaged model of that name, or `path` itself."""
  path = checkpoints.find(path)
  if checkpoints.has_checkpoints(path):
    return path
  for name in RECIPE_MODEL_STAGES:
    stage = os.path.join(path, name)
    if checkpoints.has_checkpoints(stage):
      return stage
  return path


def load_model(path: str, step: int | None = None, *, upsamplers=None
               ) -> TextToImageModel | InterleavedModel:
  """The generative model in `path` (latest checkpoint by default): a
  TextToImageModel (Parti) or an InterleavedModel, by its config.task.

  `upsamplers`: upsampler folders for a Parti model's sample(...,
  upscale=f); by default the ones inside `path` (an export) or beside it
  (an end-to-end recipe's upsampler_x2/, upsampler_x4/).
  """
  path = model_path(path)
  task = checkpoints.saved_config(path, step).get("task")
  if task == "interleaved":
    if upsamplers:
      raise ValueError("upsamplers= applies to text-to-image (Parti) "
                       f"models; {path!r} holds an interleaved model.")
    return load_interleaved(path, step)
  if task == "parti":
    return load_text_to_image(path, step, upsamplers=upsamplers)
  raise ValueError(
      f"{path!r} holds a {task!r} run; load_model expects a text-to-image "
      "('parti') or 'interleaved' run. Use unimm.load_tokenizer for "
      "tokenizers, unimm.load_upsampler for upsamplers and "
      "unimm.load_detokenizer for diffusion de-tokenizers.")


__all__ = [
    "Detokenizer", "EVAL", "InterleavedModel", "TextToImageModel",
    "Tokenizer", "Upsampler", "load_detokenizer", "load_interleaved", "load_model", "load_text_to_image", "load_tokenizer",
    "load_upsampler", "model_path",
]
