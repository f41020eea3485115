"""The inference layer: loading and sampling every kind of model, from any
working directory, without training code."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import unimm
from unimm import checkpoints
from unimm.inference import EVAL
from unimm.inference import text_to_image

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)
import random_models  # noqa: E402  pylint: disable=g-import-not-at-top

PROMPTS = ["a big red circle", "a small blue star"]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return random_models.write_random_models(str(tmp_path_factory.mktemp("m")))


def test_load_and_sample_import_no_training_code(models):
  """In a fresh interpreter: import unimm, load each kind of model, use it;
  neither TensorFlow, clu, optax nor unimm.train is imported."""
  script = textwrap.dedent(f"""
      import sys
      import numpy as np
      import unimm
      paths = {models!r}
      images = np.zeros((2, 32, 32, 3), np.uint8)
      tokenizer = unimm.load_tokenizer(paths["tokenizer"])
      tokenizer.decode(tokenizer.encode(images))
      parti = unimm.load_model(paths["parti"], upsamplers=[paths["upsampler"]])
      parti.sample(["a red circle"], upscale=4)
      interleaved = unimm.load_model(paths["interleaved"])
      interleaved.sample(["a red circle"])
      interleaved.caption(images[:1])
      unimm.load_upsampler(paths["upsampler"]).upscale(images)
      banned = ("tensorflow", "clu", "optax", "unimm.train")
      print("BANNED", sorted(m for m in sys.modules if any(
          m == b or m.startswith(b + ".") for b in banned)))
      print("MODULES", len(sys.modules))
  """)
  env = dict(os.environ, XLA_FLAGS="", JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-c", script], capture_output=True,
                          text=True, env=env, cwd="/", check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "BANNED []" in result.stdout, result.stdout


def test_api_defaults_are_the_eval_settings(models):
  parti = unimm.load_model(models["parti"])
  # The run's config.eval (configs/parti_shapes.py, cfg_scale changed).
  assert parti.settings == dict(cfg_scale=2.0, temperature=0.7, top_k=0,
                                top_p=1.0, batch_size=8)
  np.testing.assert_array_equal(
      parti.sample(PROMPTS, seed=1),
      parti.sample(PROMPTS, seed=1, cfg_scale=2.0, temperature=0.7,
                   top_k=0, top_p=1.0, batch_size=8))
  assert not np.array_equal(
      parti.sample_ids(PROMPTS, seed=1),
      parti.sample_ids(PROMPTS, seed=1, cfg_scale=2.0, temperature=1.0))
  # None is no guidance, for every model.
  assert parti.sampling_params(cfg_scale=None).cfg_scale is None
  assert parti.sampling_params(cfg_scale="").cfg_scale is None
  interleaved = unimm.load_model(models["interleaved"])
  assert interleaved.settings["caption_beams"] == 2
  images = interleaved.sample(PROMPTS, seed=0, cfg_scale=None)
  assert interleaved.caption(images) == interleaved.caption(
      images, num_beams=2, rerank_weight=0.5)
  assert EVAL is not None and repr(EVAL) == "<the eval's setting>"


def test_seeds_differ_and_repeat(models):
  parti = unimm.load_model(models["parti"])
  a = parti.sample_ids(PROMPTS, seed=0)
  assert np.array_equal(a, parti.sample_ids(PROMPTS, seed=0))
  assert not np.array_equal(a, parti.sample_ids(PROMPTS, seed=1))


def test_wrong_kind_of_folder_is_a_clear_error(models):
  with pytest.raises(ValueError, match="'vit_vqgan' run; load_model expects"):
    unimm.load_model(models["tokenizer"])
  with pytest.raises(ValueError, match="not a tokenizer"):
    unimm.load_tokenizer(models["parti"])
  with pytest.raises(ValueError, match="not an upsampler"):
    unimm.load_upsampler(models["parti"])
  with pytest.raises(ValueError, match="upsamplers for no factors"):
    unimm.load_model(models["parti"]).sample(PROMPTS, upscale=2)


def test_the_packaged_model_loads_by_name_and_draws_the_prompt(tmp_path,
                                                              monkeypatch):
  """unimm.load_model("shapes-parti") from any directory: the demo recipe's
  export in unimm/pretrained/, sampling with its eval's settings; a red
  object is drawn where the prompt says (the probe-free reading: red
  pixels by quadrant)."""
  assert "shapes-parti" in checkpoints.pretrained_names()
  monkeypatch.chdir(tmp_path)
  model = unimm.load_model("shapes-parti")
  with open(os.path.join(checkpoints.PRETRAINED_DIR, "shapes-parti",
                         "model_card.json")) as f:
    card = json.load(f)
  assert model.step == card["step"] and card["task"] == "parti"
  assert model.settings == card["sampling_defaults"]
  corners = {"top left": (slice(0, 16), slice(0, 16)),
             "bottom right": (slice(16, 32), slice(16, 32))}
  images = model.sample([f"a big red circle at the {c}" for c in corners],
                        seed=0).astype(int)
  red = (images[..., 0] > 150) & (images[..., 1] < 100) & (
      images[..., 2] < 100)  # [2, 32, 32]
  for image, (rows, cols) in zip(red, corners.values()):
    inside = image[rows, cols].sum()
    assert inside > 20 and inside > 2 * (image.sum() - inside), image.sum()


def test_api_inputs(models, monkeypatch):
  """Seeds of any size give their own images; a non-int seed, a bare
  string, a zero batch and a method the model lacks are clear errors
  before anything is compiled."""
  parti = unimm.load_model(models["parti"])
  assert not np.array_equal(parti.sample_ids(PROMPTS, seed=2**32),
                            parti.sample_ids(PROMPTS, seed=0))

  def no_compile(*args):
    raise AssertionError("compiled")

  monkeypatch.setattr(text_to_image, "_jitted_sample", no_compile)
  with pytest.raises(TypeError, match="seed=1.5 .* expected an int"):
    parti.sample(PROMPTS, seed=1.5)
  with pytest.raises(ValueError, match="list of strings"):
    parti.sample("a red circle")
  with pytest.raises(ValueError, match="batch_size=0; expected > 0"):
    parti.sample(PROMPTS, batch_size=0)
  with pytest.raises(TypeError, match="caption.. needs an interleaved model"):
    parti.caption(np.zeros((1, 32, 32, 3), np.uint8))
  interleaved_model = unimm.load_model(models["interleaved"])
  with pytest.raises(ValueError, match="list of strings"):
    interleaved_model.sample("a red circle")
  with pytest.raises(TypeError, match="expected an int"):
    interleaved_model.sample(PROMPTS, seed="0")


def test_empty_batches_give_empty_results(models):
  """Encoding, decoding and upscaling no images return arrays of 0 rows
  and the right shapes (a 0-row batch cannot run under XLA's reshapes)."""
  tokenizer = unimm.load_tokenizer(models["tokenizer"])
  size, (h, w) = tokenizer.image_size, tokenizer.grid
  ids = tokenizer.encode(np.zeros((0, size, size, 3), np.uint8))
  assert ids.shape == (0, h, w) and ids.dtype == np.int32
  images = tokenizer.decode(ids)
  assert images.shape == (0, size, size, 3) and images.dtype == np.uint8
  parti = unimm.load_model(models["parti"])
  assert parti.decode(np.zeros((0, h * w), np.int32)).shape == (
      0, size, size, 3)
  with pytest.raises(ValueError, match=rf"ids of shape \[N, {h * w}\]"):
    parti.decode(np.zeros((2, h, w), np.int32))
  upsampler = unimm.load_upsampler(models["upsampler"])
  base, high = upsampler.upscale(np.zeros((0, size, size, 3), np.uint8))
  assert base.shape == (0, size, size, 3)
  assert high.shape == (0, size * upsampler.factor, size * upsampler.factor,
                        3)
  with pytest.raises(ValueError, match="prompts is empty"):
    parti.sample([])
