"""Tests for the Parti task: loss, CFG dropout, sampling, evaluation, and
the shapes config."""
import json
import logging
import os
import shutil
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from unimm import api
from unimm.data import pretokenize
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import retrieval
from unimm.inference import text_to_image
from unimm.train import parti_task
from unimm.train import tasks
from unimm.train import trainer
from unimm.train.parti_task import ParTask

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "..", "configs")))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..", "data")))
import parti_shapes  # noqa: E402  pylint: disable=g-import-not-at-top
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top

TEXT_LENGTH, GRID, CODES, TEXT_VOCAB = 12, 4, 16, 64


def tiny_config(**paths):
  config = parti_shapes.get_config(
      f"size=tiny,steps=4,batch=8,text_vocab={TEXT_VOCAB},codes={CODES},"
      f"grid={GRID},text_length={TEXT_LENGTH}")
  config.model.update(embed_dim=32, num_heads=2, num_kv_heads=2, head_dim=16,
                      mlp_dim=64, encoder_layers=1, decoder_layers=1)
  config.optimizer.update(lr=3e-3, warmup_steps=0)
  config.log_every_steps = 2
  config.eval.update(num_single=8, num_pair=8, batch_size=8, cfg_scale=4.0,
                     num_loss_examples=16, num_grid_samples=6)
  for key, value in paths.items():
    if key == "pretokenized_dir":
      config.data.pretokenized_dir = value
    else:
      config[key] = value
  return config


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """A tiny tokenizer workdir, a SentencePiece model, pre-tokenized data."""
  root = tmp_path_factory.mktemp("parti")
  data_dir = str(root / "tfds")
  workdir = test_pretokenize.make_tokenizer_workdir(str(root / "tok"),
                                                    data_dir)
  spiece = test_pretokenize.make_text_tokenizer(str(root / "spiece"))
  out = str(root / "data")
  tokenizer = api.load_tokenizer(workdir)
  for split, num in (("train", 64), ("validation", 16)):
    pretokenize.pretokenize(tokenizer, spiece, "shapes_small", split, out,
                            TEXT_LENGTH, num_examples=num, batch_size=32,
                            data_dir=data_dir, tokenizer_workdir=workdir)
  return dict(tokenizer_workdir=workdir, pretokenized_dir=out)


@pytest.fixture(scope="module")
def task(files):
  return ParTask(tiny_config(**files))


@pytest.fixture(scope="module")
def batch(task):
  return next(iter(task.train_data(0, 1)))


@pytest.fixture(scope="module")
def params(task, batch):
  params, state = task.init(jax.random.PRNGKey(0), batch)
  assert state == {}
  return params


def test_config_variants_build():
  for arg in (None, "size=tiny", "size=small,steps=10,batch=16",
              "size=350m,codes=8192,grid=32,text_length=128,text_vocab=32000"):
    config = parti_shapes.get_config(arg)
    assert config.task == "parti"
    assert config.logical_axis_rules and config.mesh.data == -1
    task = tasks.get_task(config)  # builds without any files
    assert isinstance(task, ParTask)
    assert task.model.image_length == config.model.image_length
  config = parti_shapes.get_config()
  assert config.model.image_length == 64  # 8x8 tokens per 32x32 image
  assert config.model.image_vocab_size == 512
  assert 0 < config.cfg_dropout < 1


def test_train_data_batches(task, batch):
  assert batch["text_ids"].shape == (8, TEXT_LENGTH)
  assert batch["image_ids"].shape == (8, GRID * GRID)
  assert batch["image_ids"].dtype == np.int32


def test_mismatched_data_is_a_clear_error(files):
  config = tiny_config(**files)
  config.model.image_vocab_size = 32
  with pytest.raises(ValueError, match="config.model.image_vocab_size=32"):
    ParTask(config).train_data(0, 1)


def test_train_steps_lower_the_loss(task, batch, params):
  params = nn.unbox(params)
  tx = optax.adam(3e-3)
  opt_state = tx.init(params)
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  @jax.jit
  def step(params, opt_state, rng):
    (loss, (metrics, _)), grads = jax.value_and_grad(
        task.loss, has_aux=True)(params, {}, batch, rng)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics

  losses = []
  for i in range(8):
    params, opt_state, loss, metrics = step(params, opt_state,
                                            jax.random.PRNGKey(i))
    losses.append(float(loss))
  # Its own likelihood now tells its 8 captions apart: the true caption
  # ranks above chance and scores above the mean of the others.
  scores = task.retrieval_scores(params, batch["text_ids"],
                                 batch["image_ids"])  # [8, 8]
  report = retrieval.recall_at_k(scores)
  assert report["retrieval_r1"] > report["retrieval_chance_r1"], report
  margin = np.diag(scores) - (scores.sum(1) - np.diag(scores)) / 7
  assert margin.mean() > 0, margin
  assert losses[-1] < losses[0] - 0.3, losses
  assert set(metrics) == {"loss", "accuracy", "perplexity", "text_dropped"}
  np.testing.assert_allclose(metrics["perplexity"], np.exp(metrics["loss"]),
                             rtol=1e-5)
  assert 0 <= metrics["accuracy"] <= 1


def test_cfg_dropout_rate_and_rows():
  b, s = 4000, 6
  text = jnp.asarray(np.random.default_rng(0).integers(3, 50, (b, s)),
                     jnp.int32)
  uncond = jnp.asarray(text_to_image.unconditional_text_ids(1, s))
  assert uncond.tolist() == [1, 0, 0, 0, 0, 0]
  out, dropped = parti_task.apply_cfg_dropout(text, jax.random.PRNGKey(0),
                                              0.5, uncond)
  rate = float(dropped.mean())
  assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / b), rate
  np.testing.assert_array_equal(out[dropped], np.tile(uncond, (int(
      dropped.sum()), 1)))
  np.testing.assert_array_equal(out[~dropped], text[~dropped])
  _, low = parti_task.apply_cfg_dropout(text, jax.random.PRNGKey(1), 0.1,
                                        uncond)
  assert abs(float(low.mean()) - 0.1) < 4 * np.sqrt(0.09 / b)


def test_loss_drops_text_at_the_configured_rate(files, monkeypatch):
  config = tiny_config(**files)
  config.cfg_dropout = 0.5
  task = ParTask(config)
  seen = {}

  def fake_logits(params, text_ids, image_ids, rng=None):  # no model: cheap
    del params, rng
    seen["text_ids"] = text_ids
    return jnp.zeros(image_ids.shape + (CODES,))

  monkeypatch.setattr(task, "logits", fake_logits)
  b = 4096
  rng = np.random.default_rng(0)
  batch = {"text_ids": rng.integers(3, 60, (b, TEXT_LENGTH)).astype(np.int32),
           "image_ids": rng.integers(0, CODES, (b, GRID * GRID)).astype(
               np.int32)}
  loss, (metrics, _) = task.loss({}, {}, batch, jax.random.PRNGKey(3))
  np.testing.assert_allclose(loss, np.log(CODES), rtol=1e-6)  # uniform
  rate = float(metrics["text_dropped"])
  assert abs(rate - 0.5) < 4 * np.sqrt(0.25 / b), rate
  text = np.asarray(seen["text_ids"])
  dropped = (text == task.unconditional_row()).all(axis=1)
  assert dropped.mean() == rate
  np.testing.assert_array_equal(text[~dropped], batch["text_ids"][~dropped])


PROMPTS = ["a red circle", "a big blue square at the top left",
           "a green star to the left of a small yellow cross"]


# Every sampling call below uses the evaluation's settings (CFG 4.0, batches
# of 8): one compiled program for the whole file. Unguided sampling is
# covered in tests/models/test_parti.py.
SAMPLING = dict(cfg_scale=4.0, batch_size=8)


def test_sample_shapes_dtype_and_determinism(task, params):
  compiled = text_to_image._jitted_sample.cache_info  # pylint: disable=protected-access
  sampler = task.sampler(params)
  images = sampler.sample(PROMPTS, seed=0, **SAMPLING)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(
      images, task.sampler(params).sample(PROMPTS, seed=0, **SAMPLING))
  ids0 = sampler.sample_ids(PROMPTS, seed=0, **SAMPLING)
  ids1 = sampler.sample_ids(PROMPTS, seed=1, **SAMPLING)
  assert ids0.shape == (3, GRID * GRID) and ids0.dtype == np.int32
  assert ids0.min() >= 0 and ids0.max() < CODES
  assert not np.array_equal(ids0, ids1)
  # The images are the frozen tokenizer's decoding of the ids (in one
  # padded batch of 8: XLA's rounding may differ by batch size).
  padded = np.concatenate([ids0, np.zeros((5, GRID * GRID), np.int32)])
  np.testing.assert_array_equal(images, task.image_tokenizer.decode(
      padded.reshape(8, GRID, GRID))[:3])
  # Batches of 2 prompts (padded to the 8 devices): same shapes, no new
  # compile.
  size = compiled().currsize
  assert sampler.sample(PROMPTS, cfg_scale=4.0,
                        batch_size=2).shape == (3, 32, 32, 3)
  assert compiled().currsize == size


def no_compile(monkeypatch):
  def fail(model, sampling):
    raise AssertionError(f"compiled for {sampling}")
  monkeypatch.setattr(text_to_image, "_jitted_sample", fail)


@pytest.mark.parametrize("kwargs, match", [
    (dict(prompts=["a red circle", "  "]), "Prompt 1 is empty"),
    (dict(prompts=[]), "prompts is empty"),
    (dict(prompts="a red circle"), "list of strings"),
    (dict(cfg_scale=-1.0), "cfg_scale must be >= 0"),
    (dict(top_k=CODES + 1), "top_k must be in"),
    (dict(top_p=0.0), "top_p must be in"),
    (dict(temperature=-0.5), "temperature must be >= 0"),
])
def test_bad_inputs_fail_before_compiling(task, params, kwargs, match,
                                          monkeypatch):
  no_compile(monkeypatch)
  kwargs = {"prompts": PROMPTS, **kwargs}
  with pytest.raises(ValueError, match=match):
    task.sampler(params).sample(**kwargs)


def test_a_batch_too_big_for_memory_fails_early(task, params, monkeypatch):
  no_compile(monkeypatch)
  with pytest.raises(ValueError, match=r"needs about [\d.]+ GiB .* free; "
                     "lower batch_size"):
    task.sampler(params).sample(["a red circle"] * 10**7, batch_size=10**7,
                                cfg_scale=2.0)


def test_long_prompts_are_truncated_and_warned(task, params, caplog,
                                               monkeypatch):
  long = " ".join(["a red circle"] * 20)
  sampler = task.sampler(params)
  tokenizer = sampler.text_tokenizer
  full = tokenizer.pieces([long])[0]
  assert len(full) > TEXT_LENGTH
  used = []  # the text ids the compiled sampler is given
  compiled = text_to_image._jitted_sample  # pylint: disable=protected-access

  def recording(model, sampling):
    fn = compiled(model, sampling)

    def sample(params, text_ids, rng, uncond_text_ids):
      used.append(np.asarray(text_ids))
      return fn(params, text_ids, rng, uncond_text_ids)
    return sample

  monkeypatch.setattr(text_to_image, "_jitted_sample", recording)
  with caplog.at_level(logging.WARNING):
    ids = sampler.sample_ids(["a red circle", long], **SAMPLING)
  assert ids.shape == (2, GRID * GRID)
  warnings = [r.getMessage() for r in caplog.records
              if r.levelno == logging.WARNING]
  assert any("1 of 2 prompts" in m and f"text length {TEXT_LENGTH}" in m
             and f"prompt 1: {len(full)} tokens" in m for m in warnings), (
                 warnings)
  # The sampler was given the long prompt's first TEXT_LENGTH - 1 tokens
  # and EOS, the short one whole.
  assert len(used) == 1
  np.testing.assert_array_equal(
      used[0][1], np.append(full[:TEXT_LENGTH - 1], tokenizer.eos_id))
  short = tokenizer.encode(["a red circle"], TEXT_LENGTH)
  assert short.num_truncated == 0
  np.testing.assert_array_equal(used[0][0], short.ids[0])


def test_estimate_grows_with_batch_and_cache():
  model = ParTask(parti_shapes.get_config()).model
  one = text_to_image.estimate_sampling_bytes(model, 1)
  assert text_to_image.estimate_sampling_bytes(model, 10) == 10 * one
  # The KV cache alone: 2 (k, v) x layers x (64 + 24) positions x heads x dim.
  assert one >= 2 * 4 * 88 * 4 * 32 * 4


def test_trainer_program_lowers_on_the_mesh(task, batch):
  """The trainer's sharded init/step trace on 8 devices (logical names of
  every parameter resolve); training itself is covered above."""
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          trainer.device_batch(batch))
  program = trainer.build_program(task.config, task, abstract)
  assert program.mesh.shape["data"] == 8
  program.train_step.lower(program.abstract_state, program.abstract_batch)


class PixelProbe(probe_lib.Probe):
  """The real scoring code over a cheap stand-in for the probe network
  (compiling the real one costs ~10 s of CPU): it sees a circle of colour
  0 in the centre cell of every image; features are pixel statistics."""

  def _run(self, images):
    x = np.asarray(images, np.float32).reshape(len(images), -1)
    classes = {k: np.zeros((len(x), probe_lib.NUM_CELLS), np.int64)
               for k in ("occupancy", "color", "size")}
    classes["occupancy"][:, 4] = 1
    features = np.stack([x.mean(1), x.std(1), x[:, ::7].mean(1)], axis=1)
    return classes, features


def use_pixel_probe(monkeypatch):
  """Makes probe.get_probe return a PixelProbe."""
  fake = PixelProbe(probe_lib.ProbeNet(image_size=32, width=4,
                                       cell_feature_dim=8), None)
  monkeypatch.setattr(probe_lib, "get_probe", lambda *a, **k: fake)


def test_evaluate_writes_report_and_grid(task, params, tmp_path,
                                         monkeypatch):
  use_pixel_probe(monkeypatch)
  workdir = str(tmp_path)
  result = task.evaluate(params, {}, workdir, step=7)
  report = json.load(open(os.path.join(workdir, "eval", "report.json")))
  assert report == pytest.approx(result)
  for key in ("prompt_accuracy_single", "prompt_accuracy_pair",
              "color_accuracy", "shape_accuracy", "probe_fd", "eval_loss",
              "eval_accuracy", "eval_perplexity"):
    assert key in report, key
  assert 0 <= report["prompt_accuracy_single"] <= 1
  assert report["num_prompts"] == 16 and report["eval_loss_examples"] == 16
  assert report["steps"] == 7 and report["cfg_scale"] == 4.0
  assert np.isfinite(report["eval_loss"]) and report["probe_fd"] >= 0
  # What the fake probe sees: 1-object prompts of circles of colour 0 in
  # the centre are right, every 2-object prompt is wrong.
  prompt_set = probe_lib.fixed_prompt_set(8, 8)
  assert report["prompt_accuracy_pair"] == 0.0
  right = [s.objects[0].shape == "circle" for _, s in prompt_set[:8]]
  assert report["prompt_accuracy_single"] <= np.mean(right)
  # The tokenizer's ceiling is scored on the same prompts (this probe's
  # answer does not depend on the image, so the two must agree).
  assert (report["reconstructed_prompt_accuracy_single"] ==
          report["prompt_accuracy_single"])
  assert report["reconstructed_prompt_accuracy_pair"] == 0.0
  # Caption retrieval over the 16 held-out pairs (fewer than the 32 asked).
  assert report["retrieval_pairs"] == 16
  assert 0 <= report["retrieval_r1"] <= report["retrieval_r5"] <= 1
  assert report["retrieval_chance_r1"] == 1 / 16
  assert report["retrieval_chance_r5"] == 5 / 16
  assert "heldout_grid_samples" not in report
  assert not os.path.exists(os.path.join(workdir, "eval",
                                         "heldout_samples.png"))
  grid = Image.open(os.path.join(workdir, "eval", "samples.png"))
  assert grid.width == 6 * 132 + 4  # 6 cells of 128 px + 4 px gutters
  assert grid.height > 128 + 24  # images + captions
  pixels = np.asarray(grid)
  assert (pixels < 64).all(axis=-1).sum() > 100  # caption text was drawn


def test_retrieval_scores_are_summed_token_log_probs(task, params):
  heldout = task.heldout_examples(4)
  text, image = heldout["text_ids"], heldout["image_ids"]
  assert text.shape == (4, TEXT_LENGTH) and image.shape == (4, GRID * GRID)
  # The first examples of the loss split, in data set order.
  first = next(iter(task._dataset(  # pylint: disable=protected-access
      "validation", 4, shuffle=False, seed=0, num_epochs=1)))
  np.testing.assert_array_equal(text, first["text_ids"])
  np.testing.assert_array_equal(image, first["image_ids"])
  assert len(heldout["captions"]) == 4 and all(heldout["captions"])
  scores = task.retrieval_scores(params, text, image)  # [4 images, 4 texts]
  assert scores.shape == (4, 4)
  # The same 16 pairs in one forward: log_softmax at the targets.
  rows_image = np.repeat(image, 4, axis=0)  # pair (i, j) at row 4 i + j
  rows_text = np.tile(text, (4, 1))
  logits = jax.jit(task.logits)(params, rows_text, rows_image)  # [16, T, V]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  want = jnp.take_along_axis(log_probs, rows_image[..., None],
                             axis=-1)[..., 0].sum(-1)
  np.testing.assert_allclose(scores, np.asarray(want).reshape(4, 4),
                             rtol=1e-5, atol=1e-4)
  assert (scores < 0).all()
  # The caption changes the score (the text reaches the decoder).
  assert np.ptp(scores, axis=1).max() > 1e-4
  report = retrieval.recall_at_k(scores)
  assert report["retrieval_pairs"] == 4
  assert 0 <= report["retrieval_r1"] <= 1 and report["retrieval_r5"] == 1.0


def test_non_shapes_data_skips_the_probe(task, params, files, tmp_path,
                                         monkeypatch):
  """On data that is not the shapes world (here the test data relabelled as
  a converted directory's): held-out loss, retrieval and a grid of
  held-out captions with their true images and samples; no probe."""
  data = str(tmp_path / "own_data")
  shutil.copytree(files["pretokenized_dir"], data)
  for split in ("train", "validation"):
    path = pretokenize.metadata_path(data, split)
    metadata = json.load(open(path))
    metadata["source"] = "/data/converted/my_photos"
    json.dump(metadata, open(path, "w"))
  other = ParTask(tiny_config(tokenizer_workdir=files["tokenizer_workdir"],
                              pretokenized_dir=data))
  assert task.on_shapes_data() and task.data_source() == "shapes_small"
  assert not other.on_shapes_data()
  assert other.data_source() == "/data/converted/my_photos"

  def no_probe(*args, **kwargs):
    raise AssertionError("the probe ran on non-shapes data")
  monkeypatch.setattr(probe_lib, "get_probe", no_probe)
  monkeypatch.setattr(probe_lib, "fixed_prompt_set", no_probe)
  workdir = str(tmp_path / "work")
  report = other.evaluate(params, {}, workdir, step=3)
  assert report == pytest.approx(json.load(open(os.path.join(
      workdir, "eval", "report.json"))))
  assert not any(k.startswith(("prompt_", "reconstructed_", "probe_"))
                 for k in report), report
  assert report["heldout_grid_samples"] == 6
  assert report["eval_loss_examples"] == 16 and np.isfinite(
      report["eval_loss"])
  assert report["retrieval_pairs"] == 16
  assert 0 <= report["retrieval_r1"] <= report["retrieval_r5"] <= 1
  assert not os.path.exists(os.path.join(workdir, "eval", "samples.png"))
  heldout = other.heldout_examples(6)
  captions = open(os.path.join(workdir, "eval",
                               "heldout_captions.txt")).read().splitlines()
  assert captions == heldout["captions"]
  # 6 cells in rows of 4, each the true image beside the sample (64 x 32
  # px, scaled to 256 x 128).
  grid = np.asarray(Image.open(os.path.join(workdir, "eval",
                                            "heldout_samples.png")))
  assert grid.shape[1] == 4 * (256 + 4) + 4
  sampler = other.sampler(params)
  true = sampler.decode(heldout["image_ids"], 8)
  samples = sampler.sample(heldout["captions"], seed=0)
  for k in (0, 5):  # the first cell and the second row's second cell
    x, y = 4 + (k % 4) * 260, 4 + (k // 4) * (128 + 4 * 12 + 4 + 4)
    cell = grid[y:y + 128:4, x:x + 256:4]  # back to 32 x 64 px
    np.testing.assert_array_equal(cell[:, :32], true[k])
    np.testing.assert_array_equal(cell[:, 32:], samples[k])


SEED_AND_LAVIT = [(dict(num_queries=3), "tokens=3"),
                  (dict(keep_ratio=0.5, merger_layers=1), "dynamic=1")]


def _pretokenized(tmp_path, tokenizer):
  """(tokenizer workdir, pre-tokenized dir) of a random tiny tokenizer
  with the ViT-VQGAN fields `tokenizer` changed."""
  data_dir = str(tmp_path / "tfds")
  tok = test_pretokenize.make_tokenizer_workdir(str(tmp_path / "tok"),
                                                data_dir, **tokenizer)
  spiece = test_pretokenize.make_text_tokenizer(str(tmp_path / "spiece"))
  data = str(tmp_path / "data")
  for split, num in (("train", 16), ("validation", 8)):
    pretokenize.pretokenize(api.load_tokenizer(tok), spiece, "shapes_small",
                            split, data, TEXT_LENGTH, num_examples=num,
                            batch_size=32, data_dir=data_dir,
                            tokenizer_workdir=tok)
  return tok, data


@pytest.mark.parametrize("tokenizer,arg", SEED_AND_LAVIT)
def test_seed_and_lavit_data_need_their_config_arg(tokenizer, arg, tmp_path):
  """Data pre-tokenized with a SEED tokenizer (K 1-D tokens) or a LaVIT
  one (variable-length spans; its image_length equals the grid's) under a
  grid config is a clear error naming the config arg."""
  tok, data = _pretokenized(tmp_path, tokenizer)
  with pytest.raises(ValueError, match=arg):
    ParTask(tiny_config(tokenizer_workdir=tok,
                        pretokenized_dir=data)).train_data(0, 1)


@pytest.mark.slow
@pytest.mark.parametrize("tokenizer,arg", SEED_AND_LAVIT)
def test_parti_on_seed_and_lavit_tokens(tokenizer, arg, tmp_path,
                                        monkeypatch):
  """Parti on a SEED tokenizer's K 1-D tokens (tokens=K) and on a LaVIT
  tokenizer's variable-length spans (dynamic=1): data pre-tokenized with
  the tokenizer trains, evaluates, saves, loads and samples images the
  tokenizer decodes."""
  use_pixel_probe(monkeypatch)
  tok, data = _pretokenized(tmp_path, tokenizer)
  grid_config = tiny_config(tokenizer_workdir=tok, pretokenized_dir=data)
  config = parti_shapes.get_config(
      f"size=tiny,steps=4,batch=8,text_vocab={TEXT_VOCAB},codes={CODES},"
      f"grid={GRID},text_length={TEXT_LENGTH},{arg}")
  config.model.update(grid_config.model.to_dict(),
                      image_length=config.model.image_length,
                      positions=config.model.positions,
                      end_of_image=config.model.end_of_image)
  config.optimizer.update(lr=3e-3, warmup_steps=0)
  config.eval.update(grid_config.eval.to_dict())
  config.eval.update(num_single=4, num_pair=0, batch_size=4,
                     num_loss_examples=8, num_grid_samples=2)
  config.update(tokenizer_workdir=tok)
  config.data.pretokenized_dir = data
  assert config.model.positions == "learned"  # 1-D: no rows and columns
  workdir = str(tmp_path / "run")
  trainer.train(config, workdir, ParTask(config))
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  assert np.isfinite(report["eval_loss"])
  model = api.load_model(workdir)
  prompts = ["a big red circle", "a small blue star", "a green square"]
  ids = model.sample_ids(prompts, seed=0, cfg_scale=None, temperature=1.0)
  images = model.sample(prompts, seed=0, cfg_scale=None, temperature=1.0)
  assert images.shape == (3, 32, 32, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(
      images, model.tokenizer.decode(ids.reshape((3,) + model.tokenizer.grid)))
  if config.model.end_of_image:  # codes, then -1 after the span's EOI
    kept = ids >= 0
    assert ids.shape == (3, GRID * GRID)
    assert np.all(kept[:, :-1] >= kept[:, 1:])
  else:
    assert ids.shape[-1] == 3 and (ids >= 0).all()
