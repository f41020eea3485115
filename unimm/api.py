"""The public Python API: the inference layer, re-exported.

  tok = unimm.load_tokenizer("workdirs/demo/tokenizer")
  ids = tok.encode(images)        # uint8 [N, H, W, 3] -> int32 [N, h, w]
  images = tok.decode(ids)        # -> uint8 [N, H, W, 3]
  model = unimm.load_model("workdirs/demo")     # or an exported folder
  images = model.sample(prompts, seed=0)        # the eval's settings
  images = model.sample(prompts, seed=0, upscale=4)   # -> [N, 4H, 4W, 3]
  up = unimm.load_upsampler("workdirs/demo/upsampler_x4")
  base, high = up.upscale(images)  # images at the tokenizer's resolution
  detok = unimm.load_detokenizer("workdirs/detok")
  images = detok.decode(ids)       # codes -> images by flow matching

Nothing here imports training code (unimm.train), optax, clu or
TensorFlow.
"""
# pylint: disable=unused-import
from unimm.checkpoints import saved_config
from unimm.inference import Detokenizer
from unimm.inference import EVAL
from unimm.inference import InterleavedModel
from unimm.inference import load_detokenizer
from unimm.inference import load_interleaved
from unimm.inference import load_model
from unimm.inference import load_text_to_image
from unimm.inference import load_tokenizer
from unimm.inference import load_upsampler
from unimm.inference import model_path
from unimm.inference import TextToImageModel
from unimm.inference import Tokenizer
from unimm.inference import Upsampler
