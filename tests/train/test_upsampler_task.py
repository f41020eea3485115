"""The super-resolution task: exact pairs, loss falls, trains, evaluates."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from unimm import api
from unimm.train import trainer
from unimm.train.upsampler_task import UpsamplerTask

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "data")))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top
import upsampler_shapes  # noqa: E402  pylint: disable=g-import-not-at-top


def tiny_config(tokenizer_workdir, data_dir, factor=4):
  config = upsampler_shapes.get_config(
      f"size=tiny,factor={factor},steps=2,batch=8,"
      f"tokenizer_workdir={tokenizer_workdir}")
  config.model.update(width=8, expansion=2, num_blocks=1)
  config.data.update(source="shapes_small", data_dir=data_dir)
  config.eval.update(num_images=12, batch_size=8)
  config.log_every_steps = 1
  return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  return test_pretokenize.tokenizer_files(tmp_path_factory, "upsampler")


@pytest.fixture(scope="module")
def task(files):
  return UpsamplerTask(tiny_config(**files))


@pytest.fixture(scope="module")
def batch(task):
  return next(iter(task.train_data(0, 1)))


def test_pairs_are_the_same_scene_at_two_resolutions(batch):
  images, targets = batch["image"], batch["target"]
  assert images.shape == (8, 32, 32, 3) and images.dtype == np.uint8
  assert targets.shape == (8, 128, 128, 3) and targets.dtype == np.uint8
  # Box-filtering the 128 render down to 32 gives (nearly) the 32 render;
  # another scene's 32 render is far off.
  down = np.stack([np.asarray(Image.fromarray(t).resize((32, 32), Image.BOX))
                   for t in targets]).astype(np.float64)
  same = np.abs(down - images).mean(axis=(1, 2, 3))
  other = np.abs(down - np.roll(images, 1, axis=0)).mean(axis=(1, 2, 3))
  assert same.max() < 3.0, same
  assert np.all(other > same), (same, other)


def test_train_steps_lower_the_loss(task, batch):
  params, state = task.init(jax.random.PRNGKey(0), batch)
  params = nn.unbox(params)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def step(params, opt_state):
    (loss, (metrics, _)), grads = jax.value_and_grad(
        task.loss, has_aux=True)(params, state, batch, jax.random.PRNGKey(0))
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  losses = []
  for _ in range(10):
    params, opt_state, loss, metrics = step(params, opt_state)
    losses.append(float(loss))
  assert losses[-1] < 0.9 * losses[0], losses
  assert set(metrics) == {"l2", "psnr_gain_db"}
  # The tokenizer's parameters are state, not trained.
  assert "tokenizer" not in params


def test_train_restore_upscale_and_evaluate(task, files, tmp_path):
  config = tiny_config(**files)
  workdir = str(tmp_path / "up")
  state = trainer.train(config, workdir, UpsamplerTask(config))
  assert int(state.step) == 2

  upsampler = api.load_upsampler(workdir)
  assert upsampler.factor == 4 and upsampler.base_size == 32
  images = next(iter(task.train_data(0, 1)))["image"][:3]
  decoded, high = upsampler.upscale(images)
  assert decoded.shape == (3, 32, 32, 3) and high.shape == (3, 128, 128, 3)
  assert high.dtype == np.uint8
  _, again = upsampler.upscale(images)
  np.testing.assert_array_equal(high, again)
  ids = upsampler.tokenizer.encode(images)
  _, from_ids = upsampler.upsample_ids(ids)
  np.testing.assert_array_equal(from_ids, high)

  with pytest.raises(ValueError, match=r"base resolution \[N, 32, 32, 3\]"):
    upsampler.upscale(np.zeros((1, 64, 64, 3), np.uint8))

  # The task evaluates through the same inference upsampler.
  report = task.evaluate(upsampler.params, {}, workdir, upsampler.step)
  assert report["num_images"] == 12
  assert report["psnr_gain_db"] == pytest.approx(
      report["psnr"] - report["bicubic_psnr"])
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    saved = json.load(f)
  assert saved["psnr"] == pytest.approx(report["psnr"])
  assert saved["split"] == "test"
  grid = Image.open(os.path.join(workdir, "eval", "comparison.png"))
  assert grid.size == (8 * 128, 3 * 128 + 8)
