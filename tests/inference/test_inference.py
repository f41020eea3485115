"""The inference layer: loading and sampling every kind of model, from any
working directory, without training code."""
import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

import unimm
from unimm import checkpoints
from unimm.data import shapes
from unimm.inference import EVAL
from unimm.inference import text_to_image
from unimm.models import interleaved as il
from unimm.models import vocab

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
                                top_p=1.0, contrastive_alpha=None,
                                contrastive_k=1, sjd_window=0,
                                batch_size=8)
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


def _load_packaged(name, task, tmp_path, monkeypatch):
  """unimm.load_model(name) from another working directory, and its model
  card (the step and task it names are the loaded model's)."""
  assert name in checkpoints.pretrained_names()
  monkeypatch.chdir(tmp_path)
  model = unimm.load_model(name)
  with open(os.path.join(checkpoints.PRETRAINED_DIR, name,
                         "model_card.json")) as f:
    card = json.load(f)
  assert model.step == card["step"] and card["task"] == task
  return model, card


def _assert_draws_red_where_asked(model):
  """A red object drawn in the corner each prompt names (the probe-free
  reading: red pixels by quadrant)."""
  corners = {"top left": (slice(0, 16), slice(0, 16)),
             "bottom right": (slice(16, 32), slice(16, 32))}
  images = model.sample([f"a big red circle at the {c}" for c in corners],
                        seed=0).astype(int)
  red = (images[..., 0] > 150) & (images[..., 1] < 100) & (
      images[..., 2] < 100)  # [2, 32, 32]
  for image, (rows, cols) in zip(red, corners.values()):
    inside = image[rows, cols].sum()
    assert inside > 20 and inside > 2 * (image.sum() - inside), image.sum()


def test_the_packaged_model_loads_by_name_and_draws_the_prompt(tmp_path,
                                                              monkeypatch):
  """unimm.load_model("shapes-parti") from any directory: the demo recipe's
  export in unimm/pretrained/, sampling with its eval's settings; a red
  object is drawn where the prompt says."""
  model, card = _load_packaged("shapes-parti", "parti", tmp_path,
                               monkeypatch)
  # The card's settings, and the defaults of those it predates (CD-K off).
  assert model.settings == dict(text_to_image.SAMPLING_DEFAULTS,
                                **card["sampling_defaults"])
  _assert_draws_red_where_asked(model)


def test_the_packaged_interleaved_model_captions_and_draws(tmp_path,
                                                          monkeypatch):
  """unimm.load_model("shapes-interleaved") from any directory: the demo
  recipe's interleaved export (configs/shapes_demo.py:model=interleaved),
  at its eval's settings. Its captions of one-object scenes (seed 123) name
  their colour and shape, and it draws a red object where the prompt says."""
  model, _ = _load_packaged("shapes-interleaved", "interleaved", tmp_path,
                            monkeypatch)
  images, _, scenes = shapes.generate(64, seed=123)
  single = [i for i, s in enumerate(scenes) if len(s.objects) == 1][:4]
  parsed = [shapes.parse_caption(c) for c in model.caption(images[single])]
  right = sum(p is not None and len(p.objects) == 1 and
              (p.objects[0].color, p.objects[0].shape) ==
              (scenes[i].objects[0].color, scenes[i].objects[0].shape)
              for p, i in zip(parsed, single))
  assert right >= 3, parsed
  _assert_draws_red_where_asked(model)


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


def cd_k_argmax(cond, uncond, alpha, k, allowed=None):
  """Greedy CD-K over logits [..., V] in float64 numpy: the argmax of
  log p_c - log p_u over the head {v : p_c(v) >= alpha * p_c^(k)}, p_c
  renormalised over the allowed ids."""
  cond = np.asarray(cond, np.float64)
  if allowed is not None:
    cond = np.where(allowed, cond, -np.inf)
  expert = np.asarray(jax.nn.log_softmax(cond, axis=-1))
  amateur = np.asarray(jax.nn.log_softmax(np.asarray(uncond, np.float64),
                                          axis=-1))
  kth = -np.sort(-expert, axis=-1)[..., k - 1:k]
  head = expert >= kth + np.log(alpha)
  return np.where(head, expert - amateur, -np.inf).argmax(-1)


def test_parti_contrastive_decoding_through_the_api(models, monkeypatch):
  """contrastive_alpha given, cfg_scale left at the eval's 2.0: CD-K
  without guidance over the doubled batch (the memory check counts 2
  rows a prompt), greedy CD-K of two teacher-forced full forwards (the
  prompt; the empty prompt); both given is an error before compiling."""
  parti = unimm.load_model(models["parti"])
  sampling = parti.sampling_params(contrastive_alpha=0.1, contrastive_k=2)
  assert (sampling.cfg_scale, sampling.contrastive_alpha,
          sampling.contrastive_k, sampling.doubled) == (None, 0.1, 2, True)
  assert parti.sampling_params(cfg_scale=1.5).contrastive_alpha is None
  checked = []
  monkeypatch.setattr(parti, "check_memory",
                      lambda n, doubled: checked.append(doubled))
  ids = parti.sample_ids(PROMPTS, temperature=0.0, contrastive_alpha=0.1,
                         contrastive_k=2)
  assert checked == [True]
  model, params = parti.model, {"params": jax.device_get(parti.params)}
  text_ids = parti.text_tokenizer.encode(PROMPTS, model.text_length).ids
  uncond = np.tile(parti.unconditional_row(), (len(PROMPTS), 1))
  full = jax.jit(model.apply)
  cond_logits = full(params, text_ids, ids)  # [N, T, V]
  np.testing.assert_array_equal(
      ids, cd_k_argmax(cond_logits, full(params, uncond, ids), 0.1, 2))
  # The unconditional half matters: plain greedy would differ.
  assert (ids != np.argmax(cond_logits, axis=-1)).any()

  def no_compile(*args):
    raise AssertionError("compiled")

  monkeypatch.setattr(text_to_image, "_jitted_sample", no_compile)
  with pytest.raises(ValueError, match="contrastive_alpha=0.1 and cfg_scale="
                     "2.0 are both set"):
    parti.sample(PROMPTS, cfg_scale=2.0, contrastive_alpha=0.1)


def test_interleaved_contrastive_decoding_through_the_api(models,
                                                          monkeypatch):
  """The same for the interleaved model's sample(): the amateur is the
  prompt with its text dropped, so the first image is greedy CD-K of full
  forwards over [BOS, text, BOI, codes] and [BOS, BOI, codes]."""
  interleaved = unimm.load_model(models["interleaved"])
  assert interleaved.settings["cfg_scale"] == 1.5
  assert (interleaved.settings["contrastive_alpha"],
          interleaved.settings["contrastive_k"]) == (None, 1)
  calls = []
  continue_documents = il.continue_documents

  def recorded(model, params, prompts, rng, **kwargs):
    out = continue_documents(model, params, prompts, rng, **kwargs)
    calls.append((prompts, kwargs["image_sampling"], out))
    return out

  monkeypatch.setattr(il, "continue_documents", recorded)
  interleaved.sample(PROMPTS, temperature=0.0, contrastive_alpha=0.1,
                     contrastive_k=2)
  (prompts, sampling, out), = calls
  assert (sampling.cfg_scale, sampling.contrastive_alpha,
          sampling.contrastive_k) == (None, 0.1, 2)  # guidance off
  layout, n = interleaved.layout, interleaved.image_length
  documents = [np.concatenate([p[p != vocab.PAD], c])
               for p, c in zip(prompts, out[:, :n])]
  documents += [d[~layout.is_text(d)] for d in documents]  # [cond; uncond]
  width = max(len(d) for d in documents)
  logits = np.asarray(jax.jit(interleaved.model.apply)(
      {"params": interleaved.params},
      np.stack([np.pad(d, (0, width - len(d))) for d in documents])))
  at = np.array([len(d) - n - 1 + np.arange(n) for d in documents])
  cond, uncond = np.split(np.take_along_axis(logits, at[..., None], axis=1),
                          2)  # [N, n, V] each: the logits of the codes
  image = np.asarray(layout.is_image(np.arange(layout.size)))
  np.testing.assert_array_equal(out[:, :n],
                                cd_k_argmax(cond, uncond, 0.1, 2, image))
  assert (out[:, :n] != np.where(image, cond, -np.inf).argmax(-1)).any()
  with pytest.raises(ValueError, match="contrastive_alpha=0.1 and cfg_scale="
                     "1.5 are both set"):
    interleaved.sample(PROMPTS, cfg_scale=1.5, contrastive_alpha=0.1)
  assert len(calls) == 1  # nothing was sampled


def test_sjd_window_through_the_api(models, monkeypatch):
  """sample_ids(sjd_window=4) decodes by speculative Jacobi decoding: at
  temperature 0 (the eval's guidance on) it gives the plain greedy ids; a
  bad window is a ValueError naming the setting before compiling, for
  both kinds of model."""
  parti = unimm.load_model(models["parti"])
  assert parti.sampling_params().sjd_window == 0
  assert parti.sampling_params(sjd_window=4).sjd_window == 4
  np.testing.assert_array_equal(
      parti.sample_ids(PROMPTS, temperature=0.0, sjd_window=4),
      parti.sample_ids(PROMPTS, temperature=0.0))

  def no_compile(*args, **kwargs):
    raise AssertionError("compiled")

  monkeypatch.setattr(text_to_image, "_jitted_sample", no_compile)
  monkeypatch.setattr(il, "_jitted_phases", no_compile)
  with pytest.raises(ValueError, match="sjd_window=1; expected 0"):
    parti.sample(PROMPTS, sjd_window=1)
  interleaved_model = unimm.load_model(models["interleaved"])
  with pytest.raises(ValueError, match="sjd_window=-4; expected 0"):
    interleaved_model.sample(PROMPTS, sjd_window=-4)
