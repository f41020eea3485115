"""SEED / LaVIT tokens decoded through a frozen grid tokenizer
(config.model.teacher_codes, config.teacher_workdir): the task installs
the teacher's trained params, no gradient reaches them, the targets are
the teacher's own encoding, decoding is the teacher's decoder on the
likeliest codes, a saved tokenizer loads alone, and bad settings are clear
errors."""
import os
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm import api
from unimm.inference import tokenizer as tokenizer_lib
from unimm.tokenizers import vit_vqgan as vq
from unimm.train import vqgan_task

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "data"))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top

CODES = 16  # the tiny teacher's (test_pretokenize.tiny_tokenizer_config)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("teacher")
  data_dir = str(root / "tfds")
  teacher = test_pretokenize.make_tokenizer_workdir(str(root / "teacher"),
                                                    data_dir)
  return dict(root=root, data_dir=data_dir, teacher=teacher)


def _config(files, **model):
  config = test_pretokenize.tiny_tokenizer_config(files["data_dir"])
  config.model.update(dict(num_queries=3, teacher_codes=CODES,
                           token_decoder="joint"), **model)
  config.teacher_workdir = files["teacher"]
  return config


def _images(n, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3),
                                              dtype=np.uint8)


@pytest.fixture(scope="module", params=[False, True],
                ids=["own_encoder", "teacher_encoder"])
def student(files, request):
  task = vqgan_task.ViTVQGANTask(_config(
      files, read_teacher_encoder=request.param))
  params, state = task.init(jax.random.PRNGKey(0),
                            {"image": _images(4)})
  return task, nn.unbox(params), state


def test_init_installs_the_teachers_trained_params(files, student):
  task, params, _ = student
  teacher = api.load_tokenizer(files["teacher"])
  installed = params["generator"]["frozen_teacher"]
  trained = nn.unbox(teacher.params)
  assert jax.tree.structure(installed) == jax.tree.structure(trained)
  for a, b in zip(jax.tree.leaves(installed), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert task.dependencies() == {
      "teacher_workdir": tokenizer_lib.fingerprint(teacher)}


def test_targets_are_the_teachers_codes_and_no_gradient_reaches_it(
    files, student):
  task, params, state = student
  teacher = api.load_tokenizer(files["teacher"])
  images = _images(4, seed=1)
  out = task.model.apply({"params": params["generator"]}, jnp.asarray(images))
  np.testing.assert_array_equal(
      np.asarray(out["teacher_ids"]).reshape(4, *teacher.grid),
      teacher.encode(images))
  grads = jax.jit(jax.grad(lambda p: task.loss(
      p, state, {"image": jnp.asarray(images)},
      jax.random.PRNGKey(0))[0]))(params)
  frozen = jax.tree.leaves(grads["generator"]["frozen_teacher"])
  assert frozen and all(not np.any(np.asarray(g)) for g in frozen)
  # ... while the student's code head and queries learn.
  for name in ("code_head", "queries"):
    assert np.any(np.asarray(jax.tree.leaves(
        grads["generator"][name])[0])), name
  # Reading the teacher's encoder: no encoder of its own, and the tokens
  # do depend on the teacher's (frozen) encoder.
  reads_teacher = task.model.read_teacher_encoder
  assert ("encoder_transformer" in params["generator"]) != reads_teacher

  def latents_with(scale):
    teacher = params["generator"]["frozen_teacher"]
    moved = dict(teacher, patch_embed=jax.tree.map(
        lambda x: x * scale, teacher["patch_embed"]))
    generator = dict(params["generator"], frozen_teacher=moved)
    return np.asarray(task.model.apply({"params": generator},
                                       jnp.asarray(images))["latents"])
  assert np.array_equal(latents_with(1.0), latents_with(0.5)) != reads_teacher


def test_decoding_is_the_teachers_decoder_on_the_likeliest_codes(
    files, student):
  task, params, _ = student
  teacher = api.load_tokenizer(files["teacher"])
  images = jnp.asarray(_images(3, seed=2))
  generator = {"params": params["generator"]}
  out = task.model.apply(generator, images)
  likeliest = np.asarray(jnp.argmax(out["teacher_logits"], -1)).reshape(
      3, *teacher.grid)
  by_teacher = teacher.decode(likeliest)
  ids = task.model.apply(generator, images, method=vq.ViTVQGAN.encode)
  np.testing.assert_array_equal(ids, out["ids"])
  decoded = vq.decode_ids(task.model, params["generator"], np.asarray(ids))
  np.testing.assert_array_equal(decoded, by_teacher)
  np.testing.assert_array_equal(
      np.round(np.asarray(out["recon"]) * 255).astype(np.uint8), by_teacher)


def test_a_saved_student_loads_and_decodes_without_its_teacher(files):
  workdir = test_pretokenize.make_tokenizer_workdir(
      str(files["root"] / "student"), files["data_dir"],
      teacher_workdir=files["teacher"], num_queries=3, teacher_codes=CODES)
  tokenizer = api.load_tokenizer(workdir)
  assert tokenizer.grid == (1, 3) and tokenizer.model.teacher_codes == CODES
  images = _images(2, seed=3)
  ids = tokenizer.encode(images)
  assert ids.shape == (2, 1, 3)
  out = tokenizer.model.apply({"params": nn.unbox(tokenizer.params)},
                              jnp.asarray(images))
  np.testing.assert_array_equal(
      tokenizer.decode(ids),
      np.round(np.asarray(out["recon"]) * 255).astype(np.uint8))


def test_a_deeper_token_decoder_keeps_the_teachers_depth(files):
  task = vqgan_task.ViTVQGANTask(_config(files, token_decoder_layers=3))
  params = jax.eval_shape(task.model.init, jax.random.PRNGKey(0),
                          jnp.zeros((1, 32, 32, 3), jnp.uint8))["params"]
  names = lambda tree: sorted(k for k in tree if k.startswith("layers"))  # noqa: E731
  assert len(names(params["decoder_transformer"])) == 3
  assert len(names(params["frozen_teacher"]["decoder_transformer"])) == 1


def test_bad_settings_are_clear_errors(files, tmp_path):
  with pytest.raises(ValueError, match="teacher_codes=16 decodes"):
    vqgan_task.ViTVQGANTask(_config(files, num_queries=0))
  with pytest.raises(ValueError, match="config.teacher_workdir"):
    config = _config(files)
    config.teacher_workdir = ""
    vqgan_task.ViTVQGANTask(config)
  with pytest.raises(ValueError, match="num_codes=16 there, 32 here"):
    vqgan_task.ViTVQGANTask(_config(files, teacher_codes=32))
  with pytest.raises(ValueError, match="encoder_embed_dim=16 there, 32 here"):
    vqgan_task.ViTVQGANTask(_config(files, encoder_embed_dim=32))
  config = _config(files, teacher_codes=0)
  with pytest.raises(ValueError, match="teacher_codes=0 decodes pixels"):
    vqgan_task.ViTVQGANTask(config)
  config = _config(files, teacher_codes=0, read_teacher_encoder=True)
  config.teacher_workdir = ""
  with pytest.raises(ValueError, match="read_teacher_encoder=True reads"):
    vqgan_task.ViTVQGANTask(config)
  sys.path.insert(0, os.path.join(HERE, "..", "..", "configs"))
  import vit_vqgan_shapes  # pylint: disable=g-import-not-at-top
  with pytest.raises(ValueError, match="pass tokens=K or keep=R"):
    vit_vqgan_shapes.get_config(f"teacher={tmp_path}")
