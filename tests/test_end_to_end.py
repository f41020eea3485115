"""The end-to-end recipe (configs/shapes_demo.py) at toy size: every stage
runs, a rerun resumes without redoing work, and the trained workdir serves
unimm.load_model(...).sample and --mode sample."""
import json
import os
import signal
import sys

import jax
import numpy as np
import pytest

from unimm import api
from unimm import config_lib
from unimm import end_to_end
from unimm import experiments

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "train"))
import test_parti_task  # noqa: E402  pylint: disable=g-import-not-at-top
import test_upsampler_task  # noqa: E402  pylint: disable=g-import-not-at-top

from unimm.train import trainer  # noqa: E402
from unimm.train.parti_task import ParTask  # noqa: E402
from unimm.train.upsampler_task import UpsamplerTask  # noqa: E402

DEMO = os.path.join(HERE, "..", "configs", "shapes_demo.py")


def toy_demo_config(data_dir: str):
  """configs/shapes_demo.py shrunk to seconds of CPU."""
  config = config_lib.load_config(DEMO + ":tokenizer_steps=2,parti_steps=3,"
                                  "num_train=64,batch=8")
  tok = config.tokenizer
  tok.model.update(patch_size=8, num_codes=16, code_dim=4,
                   encoder_num_layers=1, decoder_num_layers=1,
                   encoder_embed_dim=16, decoder_embed_dim=16,
                   encoder_mlp_dim=32, decoder_mlp_dim=32)
  tok.loss.update(latent_buffer_size=16, restart_every=0)
  tok.data.update(source="shapes_small", data_dir=data_dir, batch_size=8)
  tok.eval.update(num_images=16, batch_size=16)
  config.text.num_captions = 300
  config.pretokenize.update(source="shapes_small", data_dir=data_dir,
                            splits={"train": 64, "validation": 16},
                            batch_size=32)
  parti = config.parti
  parti.model.update(image_vocab_size=16, image_length=16, embed_dim=32,
                     num_heads=2, num_kv_heads=2, head_dim=16, mlp_dim=64,
                     encoder_layers=1, decoder_layers=1)
  parti.log_every_steps = 1
  parti.eval.update(num_single=4, num_pair=4, batch_size=8,
                    num_loss_examples=16, num_grid_samples=4)
  return config


def _sigterm_in_parti_step(step: int, monkeypatch) -> None:
  """Sends this process SIGTERM while Parti's training fetches the batch of
  `step` (the trainer stops after that step), once."""
  seen = {"task": None, "batches": 0, "sent": False, "depth": 0}
  data_iterator, device_batch = trainer._data_iterator, trainer.device_batch

  def watch_task(task, *args):
    seen.update(task=type(task).__name__, batches=0)
    return data_iterator(task, *args)

  def watch_batch(batch):
    outermost = seen["depth"] == 0  # device_batch recurses into the dict
    if outermost:
      seen["batches"] += 1
    if (outermost and seen["task"] == "ParTask"
        and seen["batches"] == step and not seen["sent"]):
      seen["sent"] = True
      os.kill(os.getpid(), signal.SIGTERM)
    seen["depth"] += 1
    try:
      return device_batch(batch)
    finally:
      seen["depth"] -= 1

  monkeypatch.setattr(trainer, "_data_iterator", watch_task)
  monkeypatch.setattr(trainer, "device_batch", watch_batch)


def test_recipe_runs_resumes_and_samples(tmp_path, monkeypatch):
  test_parti_task.use_pixel_probe(monkeypatch)
  config = toy_demo_config(str(tmp_path / "tfds"))
  workdir = str(tmp_path / "demo")
  paths = end_to_end.Paths(workdir)

  # A SIGTERM during Parti's step 2 (a real task, mid-stage): the stage
  # saves at step 2 and the recipe stops; the same call then resumes it.
  _sigterm_in_parti_step(2, monkeypatch)
  assert end_to_end.run(config, workdir) == {}
  parti_steps = os.path.join(paths.parti, "checkpoints")
  assert sorted(os.listdir(parti_steps)) == ["2"]
  assert not os.path.exists(os.path.join(paths.parti, "eval"))
  tokenizer_stamp = os.path.getmtime(paths.text_model)
  report = end_to_end.run(config, workdir)
  assert os.path.getmtime(paths.text_model) == tokenizer_stamp
  assert 0.0 <= report["prompt_accuracy_single"] <= 1.0
  assert report["steps"] == 3 and report["num_prompts"] == 8
  samples = os.path.join(paths.parti, "samples")
  pngs = sorted(f for f in os.listdir(samples) if f.endswith(".png"))
  assert pngs == [f"{i:05d}.png" for i in range(len(config.prompts))] + [
      "grid.png"]
  with open(os.path.join(paths.data, "train.json")) as f:
    assert json.load(f)["num_examples"] == 64

  # A rerun skips every finished stage: nothing is rewritten.
  stamps = {p: os.path.getmtime(p) for p in (
      paths.text_model, os.path.join(paths.data, "train.json"),
      os.path.join(paths.parti, "eval", "report.json"))}
  assert end_to_end.run(config, workdir) == report
  assert {p: os.path.getmtime(p) for p in stamps} == stamps

  # The resumed stage ends where an uninterrupted run of it ends, bit for
  # bit (data position included).
  parti_config = end_to_end.parti_config(config, workdir)
  straight = trainer.train(parti_config, str(tmp_path / "straight"),
                           ParTask(parti_config))
  resumed = trainer.restore(parti_config, paths.parti, ParTask(parti_config))
  assert resumed.step == 3
  jax.tree.map(np.testing.assert_array_equal, resumed.params,
               jax.device_get(straight.params))

  # The workdir serves the Python API (it resolves the parti/ stage) ...
  model = api.load_model(workdir)
  first = model.sample(["a big red circle at the top left", "a blue star"],
                       seed=3, temperature=1.0)
  assert first.shape == (2, 32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(
      first, model.sample(["a big red circle at the top left",
                           "a blue star"], seed=3, temperature=1.0))
  # ... and --mode sample (what unimm.main runs for an end-to-end config),
  # which leaves the recipe's own grid alone.
  recipe_grid = os.path.join(samples, "grid.png")
  stamp = os.path.getmtime(recipe_grid)
  written = experiments.sample(
      paths.parti, prompts=["a green square"], seed=0, cfg_scale=2.0)
  assert len(written) == 1 and os.path.exists(written[0])
  assert os.path.dirname(written[0]) != samples
  assert os.path.getmtime(recipe_grid) == stamp
  mine = str(tmp_path / "mine")
  assert experiments.sample(paths.parti, prompts=["a green square"],
                            output_dir=mine) == [f"{mine}/00000.png"]

  # Parti's super-resolution stage: an upsampler trained on the recipe's
  # tokenizer in workdir/upsampler_x4 is found and used by upscale=4.
  with pytest.raises(ValueError, match="upscale=4 but this model has "
                     "upsamplers for no factors"):
    model.sample(["a blue star"], upscale=4)
  up_config = test_upsampler_task.tiny_config(paths.tokenizer,
                                              str(tmp_path / "tfds"))
  up_dir = os.path.join(workdir, "upsampler_x4")
  trainer.train(up_config, up_dir, UpsamplerTask(up_config))
  model = api.load_model(workdir)
  prompts = ["a big red circle at the top left", "a blue star"]
  base, high = model.sample(prompts, seed=3, temperature=1.0, upscale=4,
                            return_base=True)
  np.testing.assert_array_equal(base, first)  # The same samples, upscaled.
  assert high.shape == (2, 128, 128, 3) and high.dtype == np.uint8
  np.testing.assert_array_equal(
      high, model.sample(prompts, seed=3, temperature=1.0, upscale=4))
  with pytest.raises(ValueError, match=r"upscale=2 .*upsamplers for \[4\]"):
    model.sample(prompts, upscale=2)
  written = experiments.sample(paths.parti, prompts=["a green square"],
                               upscale=4)
  from PIL import Image  # pylint: disable=g-import-not-at-top
  assert Image.open(written[0]).size == (128, 128)
  # The grid shows each base sample beside its upscaling.
  grid = Image.open(os.path.join(os.path.dirname(written[0]), "grid.png"))
  assert grid.size[0] > 2 * 128


def test_stage_configs_point_at_the_workdir_stages():
  config = config_lib.load_config(DEMO)
  parti = end_to_end.parti_config(config, "/w")
  assert parti.tokenizer_workdir == "/w/tokenizer"
  assert parti.text_tokenizer == "/w/text/spiece.model"
  assert parti.data.pretokenized_dir == "/w/data"
  assert config.parti.data.pretokenized_dir != "/w/data"  # a copy
  # --mode eval / sample / caption act on the model stage: parti/, or
  # interleaved/ with model=interleaved.
  assert end_to_end.model_stage(config, "/w")[1] == "/w/parti"
  config = config_lib.load_config(DEMO + ":model=interleaved")
  assert "parti" not in config
  model, stage = end_to_end.model_stage(config, "/w")
  assert stage == "/w/interleaved" and model.task == "interleaved"
  assert model.tokenizer_workdir == "/w/tokenizer"
  assert model.text_tokenizer == "/w/text/spiece.model"
  assert model.data.packed_dir == "/w/data"
  # LaVIT's tokens: the interleaved model writes spans ended by its EOI.
  lavit = config_lib.load_config(DEMO + ":model=interleaved,keep=0.5")
  assert lavit.tokenizer.model.keep_ratio == 0.5
  assert lavit.interleaved.model.end_of_image
  assert lavit.interleaved.model.image_positions == "1d"


def test_multi_host_is_refused(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  with pytest.raises(ValueError, match="runs on one host"):
    end_to_end.run(config_lib.load_config(DEMO), "/nonexistent")
