"""The diffusion de-tokenizer task: trains through the trainer, evaluates
both decoders, and the loaded model decodes as the trained one."""
import json
import os
import sys

import jax
import numpy as np
import pytest

import unimm
from unimm.data import shapes
from unimm.train import trainer
from unimm.train.detokenizer_task import DetokenizerTask

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "data")))
import detokenizer_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
import test_parti_task  # noqa: E402  pylint: disable=g-import-not-at-top
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top


def tiny_config(tokenizer_workdir, data_dir, **args):
  arg = ",".join(f"{k}={v}" for k, v in {**dict(
      steps=3, batch=8, tokenizer_workdir=tokenizer_workdir, sample_steps=2,
      probe=2), **args}.items())
  config = detokenizer_shapes.get_config(arg)
  config.model.update(embed_dim=16, num_heads=2, head_dim=8, mlp_dim=32,
                      num_layers=1)
  config.data.update(source="shapes_small", data_dir=data_dir)
  config.eval.update(num_images=12, batch_size=8)
  config.log_every_steps = 1
  return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return test_pretokenize.tokenizer_files(tmp_path_factory, "detokenizer")


def test_trains_evaluates_and_loads_back(files, tmp_path, monkeypatch):
  test_parti_task.use_pixel_probe(monkeypatch)
  config = tiny_config(**files)
  workdir = str(tmp_path / "detok")
  task = DetokenizerTask(config)
  state = trainer.train(config, workdir, task)
  assert int(state.step) == 3
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  for key in ("psnr", "tokenizer_psnr", "reconstructed_prompt_accuracy_single",
              "tokenizer_reconstructed_prompt_accuracy_pair"):
    assert key in report, key
  assert report["num_images"] == 12 and report["num_steps"] == 2
  assert report["condition"] == "codes"
  assert os.path.exists(os.path.join(workdir, "eval", "reconstructions.png"))
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert any("flow_loss" in json.loads(line) for line in f)

  detok = unimm.load_detokenizer(workdir)
  trained = task.inference_model(state.params)
  rng = np.random.default_rng(0)
  images = np.stack([shapes.render(shapes.scene_from_rng(rng), 32)
                     for _ in range(3)])
  ids = detok.tokenizer.encode(images)
  out = detok.decode(ids, seed=5)
  assert out.shape == (3, 32, 32, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, trained.decode(ids, seed=5))
  np.testing.assert_array_equal(out, detok.reconstruct(images, seed=5))
  assert not np.array_equal(out, detok.decode(ids, seed=6))
  guided = detok.decode(ids, seed=5, cfg_scale=3.0)
  assert not np.array_equal(out, guided)
  # Batches share one compiled shape; the result does not depend on it.
  np.testing.assert_array_equal(
      detok.decode_conditions(detok.conditions(images), seed=5,
                              batch_size=2)[:2],
      detok.decode_conditions(detok.conditions(images[:2]), seed=5,
                              batch_size=2))
  assert detok.decode(ids[:0]).shape == (0, 32, 32, 3)
  with pytest.raises(ValueError, match=r"expected \[N, \d+, \d+\]"):
    detok.decode(ids[:, :1])
  with pytest.raises(ValueError, match="batch_size"):
    detok.decode(ids, batch_size=0)
  with pytest.raises(TypeError, match="seed"):
    detok.decode(ids, seed=1.5)
  for steps in (0, 1.5, True):
    with pytest.raises(ValueError, match=r"num_steps=.*expected an int >= 1"):
      detok.decode(ids, num_steps=steps)


def test_an_editing_decoder_trains_on_edit_pairs(files, tmp_path,
                                                 monkeypatch):
  """SEED-X's editing decoder (source=1): batches are edit pairs, the
  source changes what it draws, and the loaded model decodes as the
  trained one, with its source and without."""
  test_parti_task.use_pixel_probe(monkeypatch)
  config = tiny_config(**files, source=1)
  task = DetokenizerTask(config)
  batch = next(iter(task.train_data(0, 1)))
  for source, image, words in zip(batch["source"], batch["image"],
                                  batch["instruction"]):
    assert source.shape == image.shape == (32, 32, 3)
    assert not np.array_equal(source, image), words  # every edit shows
  workdir = str(tmp_path / "edit")
  state = trainer.train(config, workdir, task)
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  for key in ("psnr", "psnr_without_source", "source_psnr",
              "edit_accuracy", "edit_accuracy_without_source",
              "reconstructed_prompt_accuracy_single"):
    assert key in report, key
  detok = unimm.load_detokenizer(workdir)
  ids = detok.tokenizer.encode(batch["image"][:3])
  sources = np.asarray(batch["source"][:3])
  out = detok.decode(ids, source=sources, seed=5)
  np.testing.assert_array_equal(
      out, task.inference_model(state.params).decode(ids, source=sources,
                                                     seed=5))
  assert not np.array_equal(out, detok.decode(ids, seed=5))
  assert not np.array_equal(out, detok.decode(ids, source=sources[::-1],
                                              seed=5))
  with pytest.raises(ValueError, match=r"source images .*expected uint8 "
                     r"\[3, 32, 32, 3\]"):
    detok.decode(ids, source=sources[:2])
  plain = DetokenizerTask(tiny_config(**files))
  params, _ = plain.init(jax.random.PRNGKey(0), {"image": batch["image"]})
  with pytest.raises(ValueError, match="trained without source images"):
    plain.inference_model(params).decode(ids, source=sources)
  with pytest.raises(ValueError, match="source_drop_rate"):
    DetokenizerTask(tiny_config(**files, source=1, source_drop=1.0))


def test_an_encoder_conditioned_decoder_reads_continuous_tokens(files):
  task = DetokenizerTask(tiny_config(**files, condition="encoder"))
  tokenizer = task.tokenizer.model
  assert (task.model.condition_length, task.model.condition_dim) == (
      tokenizer.num_tokens, tokenizer.encoder_embed_dim)
  batch = {"image": next(iter(task.train_data(0, 1)))["image"]}
  params, state = task.init(jax.random.PRNGKey(0), batch)
  loss, (metrics, _) = jax.jit(task.loss)(params, state, batch,
                                          jax.random.PRNGKey(1))
  assert np.isfinite(float(loss)) and "flow_loss" in metrics
  detok = task.inference_model(params)
  with pytest.raises(ValueError, match="conditioned on 'encoder'"):
    detok.decode(np.zeros((1, *task.tokenizer.grid), np.int32))


def test_bad_settings_fail_before_anything_compiles(files):
  with pytest.raises(ValueError, match="config.condition='pixels'"):
    DetokenizerTask(tiny_config(**files, condition="pixels"))
  config = tiny_config(**files)
  config.model.condition_length = 7
  with pytest.raises(ValueError, match="config.model.condition_length=7"):
    DetokenizerTask(config)
  with pytest.raises(ValueError, match="condition_drop_rate"):
    DetokenizerTask(tiny_config(**files, drop=1.0))
  with pytest.raises(ValueError, match="config.loss.target='eps'"):
    DetokenizerTask(tiny_config(**files, target="eps"))
  config = tiny_config(**files)
  config.eval.num_steps = 0
  with pytest.raises(ValueError, match="num_steps"):
    DetokenizerTask(config)
