"""Tests for the ViT-VQGAN task: train step, GAN gradient separation,
dead-code restarts, evaluation files, and the shapes config."""
import json
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from unimm.data import shapes
from unimm.evaluation import probe as probe_lib
from unimm.train import vqgan_task
from unimm.train.vqgan_task import ViTVQGANTask

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
sys.path.insert(0, os.path.abspath(CONFIGS))
import vit_vqgan_shapes  # noqa: E402  pylint: disable=g-import-not-at-top


def tiny_config(**loss):
  config = vit_vqgan_shapes.get_config("size=tiny,steps=100,batch=4")
  config.model.update(image_size=16, patch_size=4, num_codes=16, code_dim=4,
                      encoder_num_layers=1, decoder_num_layers=1,
                      encoder_embed_dim=32, decoder_embed_dim=32,
                      encoder_mlp_dim=64, decoder_mlp_dim=64)
  config.data.image_size = 16
  config.discriminator.update(channel_multiplier=4, max_channels=8)
  config.loss.update({**dict(adversarial_start_step=0, latent_buffer_size=32,
                             r1_batch_size=0), **loss})
  return config


def _batch(n=4, seed=0):
  rng = np.random.default_rng(seed)
  images = np.zeros((n, 16, 16, 3), np.uint8)
  for i in range(n):  # flat backgrounds with one coloured square
    images[i] = rng.integers(0, 256, 3)
    y, x = rng.integers(0, 10, 2)
    images[i, y:y + 6, x:x + 6] = rng.integers(0, 256, 3)
  return {"image": images}


@pytest.fixture(scope="module")
def initialized():
  """(boxed params, model_state): one init shared by the tests below (every
  tiny_config variant has the same architecture)."""
  task = ViTVQGANTask(tiny_config())
  return task.init(jax.random.PRNGKey(0), _batch())


def _init(initialized):
  params, state = initialized
  return nn.unbox(params), state


def test_config_variants_build():
  for arg in (None, "size=tiny", "size=small,decoder=large,steps=10"):
    config = vit_vqgan_shapes.get_config(arg)
    assert config.task == "vit_vqgan"
    assert config.model.image_size % config.model.patch_size == 0
    assert config.logical_axis_rules
  task = ViTVQGANTask(vit_vqgan_shapes.get_config())
  assert task.model.grid == (8, 8)


def test_train_steps_lower_the_loss(initialized):
  task = ViTVQGANTask(tiny_config(adversarial_weight=0.0))
  batch = _batch()
  params, state = _init(initialized)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, state, rng):
    (loss, (metrics, state)), grads = jax.value_and_grad(
        task.loss, has_aux=True)(params, state, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    params = optax.apply_updates(params, updates)
    params, state = task.update_params(params, state, rng)
    return params, opt_state, state, metrics

  losses = []
  for i in range(6):
    params, opt_state, state, metrics = step(params, opt_state, state,
                                             jax.random.PRNGKey(i))
    losses.append(float(metrics["loss"]))
  assert losses[-1] < losses[0] - 0.05, losses
  assert int(state["step"]) == 6
  for key in ("psnr", "codebook_usage", "perplexity", "l2_loss",
              "logit_laplace_loss", "vq_loss", "adversarial_g_loss",
              "r1_penalty"):
    assert np.isfinite(float(metrics[key])), key


def _grads(task, params, state, batch):
  return jax.jit(jax.grad(lambda p, s: task.loss(p, s, batch,
                                                 jax.random.PRNGKey(0))[0]))(
                                                     params, state)


def _max_abs(tree):
  return max(float(jnp.abs(g).max()) for g in jax.tree.leaves(tree))


def test_gan_gradients_are_separated(initialized, monkeypatch):
  """Generator grads ignore the D loss; D grads ignore the G losses; the
  adversarial terms wait for adversarial_start_step."""
  task = ViTVQGANTask(tiny_config(adversarial_start_step=1,
                                     adversarial_weight=0.1))
  batch = _batch()
  params, state = _init(initialized)
  grad_fn = jax.jit(jax.grad(lambda p, s: task.loss(
      p, s, batch, jax.random.PRNGKey(0))[0]))
  before_start = grad_fn(params, state)  # step 0 < start: D untouched
  assert _max_abs(before_start["discriminator"]) == 0
  state = {**state, "step": jnp.asarray(1, jnp.int32)}
  base = grad_fn(params, state)
  assert _max_abs(base["discriminator"]) > 0

  # Scaling the discriminator's loss leaves the generator's grads unchanged.
  original = vqgan_task.losses_lib.discriminator_adversarial_loss
  monkeypatch.setattr(vqgan_task.losses_lib,
                      "discriminator_adversarial_loss",
                      lambda r, f: 7.0 * original(r, f))
  scaled_d = _grads(task, params, state, batch)
  monkeypatch.undo()
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               base["generator"], scaled_d["generator"])
  assert not np.allclose(base["discriminator"]["logits"]["kernel"],
                         scaled_d["discriminator"]["logits"]["kernel"])

  # Scaling the generator's adversarial term (and its other losses) leaves
  # the discriminator's grads unchanged.
  heavy_g = ViTVQGANTask(tiny_config(adversarial_start_step=1,
                                     adversarial_weight=5.0, l2_weight=9.0))
  scaled_g = _grads(heavy_g, params, state, batch)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6),
               base["discriminator"], scaled_g["discriminator"])
  assert not np.allclose(base["generator"]["patch_embed"]["proj"]["kernel"],
                         scaled_g["generator"]["patch_embed"]["proj"]["kernel"])


def test_update_params_restarts_dead_codes_on_schedule(initialized):
  task = ViTVQGANTask(tiny_config(restart_every=10, dead_code_threshold=0.5))
  batch = _batch()
  params, state = _init(initialized)
  usage = jnp.where(jnp.arange(16) < 8, 0.0, 3.0)
  buffer = jax.random.normal(jax.random.PRNGKey(1), (32, 4))
  codebook = params["generator"]["quantizer"]["codebook"]
  off_schedule = {"step": jnp.asarray(9), "usage": usage,
                  "latent_buffer": buffer}
  same, _ = task.update_params(params, off_schedule, jax.random.PRNGKey(2))
  np.testing.assert_array_equal(same["generator"]["quantizer"]["codebook"],
                                codebook)
  due = {**off_schedule, "step": jnp.asarray(10)}
  new_params, new_state = jax.jit(task.update_params)(
      params, due, jax.random.PRNGKey(2))
  new_codebook = new_params["generator"]["quantizer"]["codebook"]
  assert not np.allclose(new_codebook[:8], codebook[:8])
  np.testing.assert_array_equal(new_codebook[8:], codebook[8:])
  assert float(new_state["usage"].min()) >= 0.5
  # Boxed parameters keep their logical-partitioning metadata.
  boxed, _ = initialized
  boxed_new, _ = task.update_params(boxed, due, jax.random.PRNGKey(2))
  leaf = boxed_new["generator"]["quantizer"]["codebook"]
  assert isinstance(leaf, nn.LogicallyPartitioned)
  assert leaf.names == ("codes", "code_dim")


def test_evaluate_writes_report_and_grid(initialized, tmp_path,
                                         monkeypatch):
  task = ViTVQGANTask(tiny_config())
  params, state = _init(initialized)
  monkeypatch.setattr(task, "_dataset", lambda *a, **k: [
      _batch(8, seed=s) for s in range(3)])
  task.config.eval.num_images = 20
  task.config.eval.probe_prompts = 0
  result = task.evaluate(params, state, str(tmp_path), step=7)
  assert "reconstructed_prompt_accuracy_single" not in result
  assert result["num_images"] == 20 and result["steps"] == 7
  assert result["num_codes"] == 16
  assert 0 < result["codebook_usage"] <= 1
  assert np.isfinite(result["psnr"])
  with open(tmp_path / "eval" / "report.json") as f:
    assert json.load(f)["psnr"] == pytest.approx(result["psnr"])
  from PIL import Image
  grid = Image.open(tmp_path / "eval" / "reconstructions.png")
  assert grid.width > grid.height > 0


class OracleProbe(probe_lib.Probe):
  """Knows the true scene of every exact render of the fixed prompt set
  and finds nothing in any other image."""

  def __init__(self, image_size, num):
    super().__init__(probe_lib.ProbeNet(image_size=image_size), None)
    self.truth = {}
    for _, scene in probe_lib.fixed_prompt_set(num, num):
      found = tuple(probe_lib.PredictedObject(o.shape, o.color, o.size, o.cell)
                    for o in sorted(scene.objects, key=lambda o: o.cell))
      self.truth[shapes.render(scene, image_size).tobytes()] = found

  def predict(self, images):
    return [probe_lib.PredictedScene(self.truth.get(im.tobytes(), ()))
            for im in np.asarray(images)]


def test_evaluate_reads_reconstructions_with_the_probe(initialized, tmp_path,
                                                       monkeypatch):
  """The ceiling is the probe's score on what the tokenizer gives back:
  perfect for a lossless round trip, zero for this untrained one."""
  task = ViTVQGANTask(tiny_config())
  params, state = _init(initialized)
  monkeypatch.setattr(task, "_dataset", lambda *a, **k: [_batch(8)])
  task.config.eval.update(num_images=8, probe_prompts=3)
  oracle = OracleProbe(16, 3)
  monkeypatch.setattr(probe_lib, "get_probe", lambda *a, **k: oracle)
  untrained = task.evaluate(params, state, str(tmp_path), step=1)
  assert untrained["reconstructed_prompt_accuracy_single"] == 0.0
  assert untrained["reconstructed_prompt_accuracy_pair"] == 0.0
  real = task.reconstruct
  monkeypatch.setattr(task, "reconstruct",
                      lambda p, images: (real(p, images)[0], images))
  lossless = task.evaluate(params, state, str(tmp_path), step=1)
  for key in ("prompt_accuracy_single", "prompt_accuracy_pair",
              "shape_accuracy", "color_accuracy"):
    assert lossless[f"reconstructed_{key}"] == 1.0
  with open(tmp_path / "eval" / "report.json") as f:
    assert json.load(f)["reconstructed_prompt_accuracy_single"] == 1.0
  assert "tokens_per_image_single" not in lossless  # codes on the grid

  # Dynamic tokens: the tokens spent on the probe's one- and two-object
  # scenes, read from the same encodings (here one valid id per object).
  def per_object(p, images):
    ids = np.full((len(images), 1, 4), -1, np.int32)
    for i, image in enumerate(np.asarray(images)):
      ids[i, 0, :len(oracle.truth.get(image.tobytes(), ()))] = 0
    return ids, images

  monkeypatch.setattr(type(task.model), "codes_on_grid",
                      property(lambda self: False))
  monkeypatch.setattr(task, "reconstruct", per_object)
  dynamic = task.evaluate(params, state, str(tmp_path), step=1)
  assert dynamic["tokens_per_image_single"] == 1.0
  assert dynamic["tokens_per_image_pair"] == 2.0


def test_bad_settings_raise_before_compiling():
  config = tiny_config()
  config.model.patch_size = 5
  with pytest.raises(ValueError, match="config.model.patch_size"):
    ViTVQGANTask(config)
  config = tiny_config()
  config.loss.perceptual_weight = 0.1
  with pytest.raises(ValueError, match="perceptual_weights"):
    ViTVQGANTask(config)
  with pytest.raises(ValueError, match="restart_sampling"):
    ViTVQGANTask(tiny_config(restart_sampling="kmeans"))
  task = ViTVQGANTask(tiny_config())
  with pytest.raises(ValueError, match="image_size"):
    task.init(jax.random.PRNGKey(0),
              {"image": np.zeros((2, 32, 32, 3), np.uint8)})
