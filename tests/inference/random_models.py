"""Tiny models with random weights, saved as exported folders (the layout
load_tokenizer / load_model / load_upsampler read): what tests of loading
and sampling need, without compiling a training step."""
import os
import sys

import flax.linen as nn
import jax
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm import export
from unimm.data import shapes
from unimm.inference import interleaved
from unimm.inference import text_to_image
from unimm.inference import tokenizer as tokenizer_lib
from unimm.inference import upsampler
from unimm.models import interleaved as il
from unimm.models import parti
from unimm.tokenizers import text as text_lib
from unimm.tokenizers import upsampler as upsampler_model
from unimm.tokenizers import vit_vqgan

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
# pylint: disable=g-import-not-at-top,wrong-import-position
import interleaved_shapes  # noqa: E402
import parti_shapes  # noqa: E402
import upsampler_shapes  # noqa: E402
import vit_vqgan_shapes  # noqa: E402

GRID, CODES, TEXT_VOCAB, TEXT_LENGTH = 4, 16, 64, 12


def _spec(**arrays):
  return {k: {"shape": list(shape), "dtype": "int32" if k != "image"
              else "uint8"} for k, shape in arrays.items()}


def _write(out, config, init, batch_spec, seed):
  """Random params of init's shapes (normal, std 0.1), saved at step 1."""
  batch = checkpoints.abstract_batch(batch_spec)
  shapes_ = nn.unbox(jax.eval_shape(init, jax.random.PRNGKey(0), batch))
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda s: (0.1 * rng.standard_normal(s.shape)).astype(
      s.dtype), shapes_["params"])
  export.write_params_checkpoint(out, 1, params, config,
                                 {"batch_spec": batch_spec})
  return out


def write_random_models(root: str) -> dict[str, str]:
  """Folders under root: tokenizer, parti, interleaved, upsampler (each
  with its tokenizers beside it, named by relative paths)."""
  paths = {k: os.path.join(root, k) for k in
           ("tokenizer", "parti", "interleaved", "upsampler")}
  _, captions, _ = shapes.generate(300, 0)
  text_model = text_lib.train_sentencepiece(
      captions, TEXT_VOCAB, os.path.join(root, "spiece"))

  config = vit_vqgan_shapes.get_config("size=tiny,steps=1,batch=8")
  config.model.update(image_size=32, patch_size=8, num_codes=CODES,
                      code_dim=4, encoder_num_layers=1, decoder_num_layers=1,
                      encoder_embed_dim=16, decoder_embed_dim=16,
                      encoder_mlp_dim=32, decoder_mlp_dim=32)
  model = config_lib.build_module(vit_vqgan.ViTVQGAN, config.model)
  _write(paths["tokenizer"], config, tokenizer_lib.params_init(model),
         _spec(image=(2, 32, 32, 3)), 0)

  config = parti_shapes.get_config(
      f"size=tiny,steps=1,batch=8,text_vocab={TEXT_VOCAB},codes={CODES},"
      f"grid={GRID},text_length={TEXT_LENGTH},tokenizer_workdir=../tokenizer")
  config.text_tokenizer = os.path.relpath(text_model, paths["parti"])
  config.model.update(embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, encoder_layers=1, decoder_layers=1)
  config.eval.update(batch_size=8, cfg_scale=2.0)
  model = config_lib.build_module(parti.Parti, config.model)
  _write(paths["parti"], config, text_to_image.params_init(model),
         _spec(text_ids=(2, TEXT_LENGTH), image_ids=(2, GRID * GRID)), 1)

  config = interleaved_shapes.get_config(
      f"size=tiny,steps=1,batch=4,length=160,text_vocab={TEXT_VOCAB},"
      f"codes={CODES},grid={GRID},tokenizer_workdir=../tokenizer")
  config.text_tokenizer = os.path.relpath(text_model, paths["interleaved"])
  config.model.update(embed_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                      num_layers=2)
  config.eval.update(caption_beams=2, caption_rerank=0.5)
  model = config_lib.build_module(il.InterleavedLM, config.model)
  _write(paths["interleaved"], config, interleaved.params_init(model),
         _spec(tokens=(2, 160)), 2)

  config = upsampler_shapes.get_config(
      "size=tiny,factor=4,steps=1,batch=8,tokenizer_workdir=../tokenizer")
  config.model.update(width=8, expansion=2, num_blocks=1)
  model = config_lib.build_module(upsampler_model.Upsampler, config.model)
  tokenizer = tokenizer_lib.load_tokenizer(paths["tokenizer"])
  _write(paths["upsampler"], config,
         upsampler.params_init(model, tokenizer),
         _spec(image=(2, 32, 32, 3)), 3)
  return paths
