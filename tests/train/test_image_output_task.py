"""The interleaved task with Emu's image output (image_output="embeddings"):
the trainer trains and evaluates it with the tokenizer's code vectors
frozen in its params, the loaded and the exported model sample bit for bit
as the trained one (through the diffusion de-tokenizer), and mismatched
settings fail before training."""
import dataclasses
import json
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm import api
from unimm import export
from unimm.data import interleaved as il_data
from unimm.inference import detokenizer as detokenizer_lib
from unimm.train import trainer
from unimm.train.interleaved_task import InterleavedTask

import test_interleaved_task as base  # pylint: disable=g-import-not-at-top
from test_interleaved_task import files  # noqa: F401  pylint: disable=unused-import

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "inference")))
import detokenizer_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
import random_models  # noqa: E402  pylint: disable=g-import-not-at-top

PROMPTS = ["a big red circle", "a small blue star"]


def _random_detokenizer(out, tokenizer_workdir, condition="codes",
                        source=0):
  """A de-tokenizer with random weights on the test tokenizer (source=1:
  SEED-X's editing decoder)."""
  config = detokenizer_shapes.get_config(
      f"tokenizer_workdir={tokenizer_workdir},condition={condition},"
      f"sample_steps=2,source={source}")
  config.model.update(embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                      num_layers=1)
  model = detokenizer_lib.build_model(
      config, api.load_tokenizer(tokenizer_workdir))
  return random_models._write(  # pylint: disable=protected-access
      out, config, detokenizer_lib.params_init(model),
      {"image": {"shape": [2, 32, 32, 3], "dtype": "uint8"}}, 7)


def _config(files, **model):  # noqa: F811
  config = base.tiny_config(files["packed_dir"],
                            tokenizer_workdir=files["tokenizer_workdir"],
                            text_tokenizer=files["text_tokenizer"])
  tokenizer = api.load_tokenizer(files["tokenizer_workdir"])
  config.model.update(dict(
      dict(image_output="embeddings",
           embedding_dim=tokenizer.model.decoder_embed_dim), **model))
  config.eval.caption_rerank = 0.0
  return config


def test_trains_restores_exports_and_samples_through_the_detokenizer(
    files, tmp_path, monkeypatch):  # noqa: F811
  import test_parti_task  # pylint: disable=g-import-not-at-top
  test_parti_task.use_pixel_probe(monkeypatch)  # no probe training here
  config = _config(files)
  config.detokenizer_workdir = _random_detokenizer(
      str(tmp_path / "detok"), files["tokenizer_workdir"])
  config.data.batch_size = 8  # the 8 test devices each take a row
  config.eval.update(num_generation=2, generation_batch_size=2,
                     cfg_scale=2.0)
  workdir = str(tmp_path / "run")
  task = InterleavedTask(config)
  state = trainer.train(config, workdir, task)
  assert config.optimizer.name == "muon"
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert report["eval_image_loss"] > 0  # the l2 error of the regression
  for key in ("prompt_accuracy_single", "caption_accuracy", "edit_accuracy"):
    assert 0.0 <= report[key] <= 1.0

  model = api.load_model(workdir)
  tokenizer = api.load_tokenizer(files["tokenizer_workdir"])
  # The regressed vectors stayed the tokenizer's, through Muon's steps.
  np.testing.assert_array_equal(model.params["frozen_image_table"],
                                tokenizer.code_table())
  assert model.detokenizer is not None
  images = model.sample(PROMPTS, seed=0)
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  trained = task.inference_model(nn.unbox(state.params), int(state.step))
  np.testing.assert_array_equal(trained.sample(PROMPTS, seed=0), images)
  # The de-tokenizer decodes them: without it, the nearest codes by the
  # tokenizer's decoder (another picture).
  plain = dataclasses.replace(model, detokenizer=None).sample(PROMPTS, seed=0)
  assert plain.shape == images.shape and not np.array_equal(plain, images)
  captions = model.caption(images, num_beams=1, rerank_weight=0.0)
  assert len(captions) == 2 and all(isinstance(c, str) for c in captions)
  with pytest.raises(ValueError, match="codes' likelihood"):
    model.caption(images, num_beams=2, rerank_weight=0.5)
  with pytest.raises(ValueError, match="codes' likelihood"):
    model.score(images, PROMPTS)
  with pytest.raises(ValueError, match="regresses image embeddings"):
    model.sample(PROMPTS, sjd_window=3)
  # Exported and moved, its tokenizers, de-tokenizer and workdir gone: the
  # same samples.
  out = str(tmp_path / "export")
  export.export(workdir, out)
  moved = str(tmp_path / "moved" / "emu")
  shutil.move(out, moved)
  gone = [files["tokenizer_workdir"], config.detokenizer_workdir, workdir]
  for path in gone:
    os.rename(path, path + ".gone")
  try:
    np.testing.assert_array_equal(api.load_model(moved).sample(PROMPTS,
                                                               seed=0),
                                  images)
  finally:
    for path in gone:
      os.rename(path + ".gone", path)


def test_emu_over_seed_causal_tokens(files, tmp_path):  # noqa: F811
  """Emu's causal resampler with K < h*w: on a SEED tokenizer (a causal
  Q-Former writes K=4 1-D tokens from the encoder's 64 patches), an image
  span is 4 regressed embeddings, the de-tokenizer decodes [N, 4, D]
  conditions, and the loaded model samples as the trained one."""
  import test_pretokenize  # pylint: disable=g-import-not-at-top
  k = 4
  tok_dir = test_pretokenize.make_tokenizer_workdir(
      str(tmp_path / "seed_tok"), str(tmp_path / "tfds"), num_queries=k)
  tokenizer = api.load_tokenizer(tok_dir)
  assert tokenizer.grid == (1, k) and k < 64
  packed = str(tmp_path / "packed")
  for split, num in (("train", 16), ("validation", 8)):
    il_data.write_interleaved(tokenizer, files["text_tokenizer"], packed,
                              split, num, base.LENGTH, documents_per_batch=16,
                              encode_batch_size=16, tokenizer_workdir=tok_dir)
  config = base.tiny_config(packed, tokenizer_workdir=tok_dir,
                            text_tokenizer=files["text_tokenizer"])
  config.model.update(image_output="embeddings", image_length=k,
                      image_positions="1d",
                      embedding_dim=tokenizer.model.decoder_embed_dim)
  config.data.batch_size = 8  # the 8 test devices each take a row
  config.eval.update(caption_rerank=0.0, num_batches=1)
  config.detokenizer_workdir = _random_detokenizer(str(tmp_path / "detok"),
                                                   tok_dir)
  workdir = str(tmp_path / "run")
  task = InterleavedTask(config)
  state = trainer.train(config, workdir, task)
  model = api.load_model(workdir)
  assert model.image_length == k and model.detokenizer is not None
  seen = []
  decode = model.detokenizer.decode_conditions
  object.__setattr__(model.detokenizer, "decode_conditions",
                     lambda c, **kw: seen.append(np.shape(c)) or decode(
                         c, **kw))
  images = model.sample(PROMPTS, seed=0)
  assert seen == [(2, k, tokenizer.model.decoder_embed_dim)]
  assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8
  trained = task.inference_model(nn.unbox(state.params), int(state.step))
  np.testing.assert_array_equal(trained.sample(PROMPTS, seed=0), images)


def test_mismatched_settings_fail_before_training(files, tmp_path):  # noqa: F811
  with pytest.raises(ValueError, match="embedding_dim / image_codes = 3 / 16"):
    InterleavedTask(_config(files, embedding_dim=3))
  config = _config(files)
  config.eval.caption_rerank = 0.5
  with pytest.raises(ValueError, match="rerank=0"):
    InterleavedTask(config)
  config = _config(files)
  config.detokenizer_workdir = _random_detokenizer(
      str(tmp_path / "detok_encoder"), files["tokenizer_workdir"], "encoder")
  with pytest.raises(ValueError, match="condition=codes"):
    InterleavedTask(config)


def test_the_mixture_head_learns_a_fixed_batch(files):  # noqa: F811
  """GIVT's head: the image term is the mixture's negative log-likelihood
  per dimension, and it falls on a fixed batch while the table stays."""
  task = InterleavedTask(_config(files, image_head="gmm", mixtures=4))
  batch = {k: jnp.asarray(v) for k, v in next(iter(
      task.train_data(0, 1))).items()}
  params, state = task.init(jax.random.PRNGKey(0), batch)
  params = nn.unbox(params)
  table = np.asarray(params["frozen_image_table"])
  np.testing.assert_array_equal(table, task.code_table)
  tx = optax.adam(3e-3)

  @jax.jit
  def step(params, opt_state):
    (loss, (metrics, _)), grads = jax.value_and_grad(
        task.loss, has_aux=True)(params, state, batch, None)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, metrics

  opt_state = tx.init(params)
  first = None
  for _ in range(15):
    params, opt_state, metrics = step(params, opt_state)
    first = first if first is not None else float(metrics["image_loss"])
  assert float(metrics["image_loss"]) < first - 0.5, (first, metrics)
  np.testing.assert_array_equal(params["frozen_image_table"], table)
