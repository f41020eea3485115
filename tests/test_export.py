"""Tests for unimm.export: an exported folder loads from anywhere and
samples exactly what the training workdir samples."""
import json
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from unimm import api
from unimm import checkpoints
from unimm import export
from unimm.train import trainer
from unimm.train.parti_task import ParTask

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "train"))
import test_parti_task  # noqa: E402  pylint: disable=g-import-not-at-top

files = test_parti_task.files  # the module-scoped fixture
PROMPTS = ["a big red circle", "a small blue star at the top left"]


@pytest.fixture(scope="module")
def run(files, tmp_path_factory):  # pylint: disable=redefined-outer-name
  """A 2-step Parti run trained from a working directory `root`, with its
  tokenizers named by paths relative to it (as a user types them)."""
  root = str(tmp_path_factory.mktemp("export"))
  here = os.getcwd()
  os.chdir(root)
  try:
    paths = {k: os.path.relpath(v, root) for k, v in files.items()}
    config = test_parti_task.tiny_config(**paths)
    config.total_steps = 2
    config.eval.update(num_single=2, num_pair=2, num_loss_examples=8)
    monkeypatch = pytest.MonkeyPatch()
    test_parti_task.use_pixel_probe(monkeypatch)
    try:
      trainer.train(config, "run", ParTask(config))
    finally:
      monkeypatch.undo()
  finally:
    os.chdir(here)
  return os.path.join(root, "run")


def test_an_export_moved_elsewhere_samples_bit_identically(
    run, files, tmp_path, monkeypatch):  # pylint: disable=redefined-outer-name
  # The training workdir loads from another working directory: its
  # relative paths resolve against where training started.
  monkeypatch.chdir(tmp_path)
  expected = api.load_model(run).sample(PROMPTS, seed=3)
  card = export.export(run, "out")
  assert card["task"] == "parti" and card["step"] == 2
  assert card["parameters"] > 0 and card["load_with"] == "unimm.load_model"
  assert card["eval_report"]["steps"] == 2
  assert card["sampling_defaults"]["cfg_scale"] == 4.0
  with open(os.path.join("out", export.MODEL_CARD)) as f:
    assert json.load(f)["step"] == 2
  assert sorted(os.listdir("out")) == [
      "checkpoints", "model_card.json", "text_tokenizer.model", "tokenizer"]
  # Move it, and take away everything it was made from.
  moved = str(tmp_path / "elsewhere" / "shapes-parti")
  shutil.move("out", moved)
  os.makedirs("cwd")
  monkeypatch.chdir("cwd")
  gone = [files["tokenizer_workdir"], files["pretokenized_dir"], run]
  for path in gone:
    os.rename(path, path + ".gone")
  try:
    model = api.load_model(moved)
    np.testing.assert_array_equal(model.sample(PROMPTS, seed=3), expected)
    tokenizer = api.load_tokenizer(os.path.join(moved, "tokenizer"))
    assert tokenizer.grid == model.image_tokenizer.grid
  finally:
    for path in gone:
      os.rename(path + ".gone", path)


def test_a_missing_part_is_named(run, tmp_path):  # pylint: disable=redefined-outer-name
  out = str(tmp_path / "out")
  export.export(run, out)
  os.remove(os.path.join(out, export.TEXT_TOKENIZER_FILE))
  with pytest.raises(ValueError, match=r"needs text_tokenizer="
                     r"'text_tokenizer.model', which is not there"):
    api.load_model(out)


def test_export_refuses_a_folder_in_use(run, tmp_path):  # pylint: disable=redefined-outer-name
  (tmp_path / "full").mkdir()
  (tmp_path / "full" / "x").write_text("keep me")
  with pytest.raises(ValueError, match="not empty"):
    export.export(run, str(tmp_path / "full"))
  assert (tmp_path / "full" / "x").read_text() == "keep me"
  with pytest.raises(ValueError, match="no checkpoints/"):
    api.load_model(str(tmp_path / "full"))


def test_a_swapped_tokenizer_is_named_not_used(run, files, tmp_path):  # pylint: disable=redefined-outer-name
  """Another tokenizer of the same shapes at the recorded path: loading
  fails naming both fingerprints (it would otherwise sample garbage)."""
  path = files["tokenizer_workdir"]
  tokenizer = api.load_tokenizer(path)
  _, config, meta = checkpoints.saved(path)
  other = str(tmp_path / "other")
  export.write_params_checkpoint(
      other, tokenizer.step,
      {"generator": jax.tree.map(lambda x: x * 1.01, tokenizer.params)},
      config, meta)
  os.rename(path, path + ".mine")
  shutil.move(other, path)
  try:
    with pytest.raises(ValueError, match=r"trained with a tokenizer_workdir "
                       r"of fingerprint \w+, but .* holds another one"):
      api.load_model(run)
  finally:
    shutil.rmtree(path)
    os.rename(path + ".mine", path)
  assert api.load_model(run).step == 2
