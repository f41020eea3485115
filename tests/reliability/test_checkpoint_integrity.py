"""Fault injection: a damaged latest checkpoint (bytes flipped, a file
truncated or deleted) is named, and loading and resuming fall back to the
newest intact one; resuming then trains on to the same parameters."""
import os
import shutil
import sys

import jax
import numpy as np
import pytest

from unimm import checkpoints
from unimm.train import trainer

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import toy_task  # noqa: E402  pylint: disable=g-import-not-at-top


def _config():
  return toy_task.make_config(total_steps=4, checkpoint_every_steps=2,
                              keep_checkpoints=3, log_every_steps=2)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A finished run with checkpoints at steps 2 and 4, and its final
  params."""
  workdir = str(tmp_path_factory.mktemp("run") / "w")
  config = _config()
  state = trainer.train(config, workdir, toy_task.ToyTask(config))
  return workdir, jax.device_get(state.params)


def _data_files(workdir, step):
  root = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(d, f) for d, _, names in os.walk(root)
           for f in names if os.sep + "d" + os.sep in os.path.join(d, f)]
  assert files, root
  return sorted(files, key=os.path.getsize, reverse=True)


def flip(path):
  data = bytearray(open(path, "rb").read())
  for i in range(len(data) // 3, len(data) // 3 + 64):
    data[i] ^= 0xFF
  open(path, "wb").write(bytes(data))


def truncate(path):
  os.truncate(path, os.path.getsize(path) // 2)


DAMAGE = {"flip": flip, "truncate": truncate, "delete": os.remove}


@pytest.mark.parametrize("how", sorted(DAMAGE))
def test_damage_is_named_and_skipped(run, tmp_path, how, caplog):
  source, final = run
  workdir = str(tmp_path / "w")
  shutil.copytree(source, workdir)
  for path in _data_files(workdir, 4):
    DAMAGE[how](path)
  config = _config()
  task = toy_task.ToyTask(config)
  # Loading for inference: the newest intact checkpoint, with a warning.
  restored = trainer.restore(config, workdir, task)
  assert restored.step == 2
  assert "The checkpoint at step 4" in caplog.text and "damaged" in caplog.text
  with pytest.raises(ValueError, match=r"No intact checkpoint.*step 4.*"
                     r"step=N"):
    trainer.restore(config, workdir, task, step=4)
  # Resuming: from step 2; the damaged step is set aside and trained anew,
  # to the same parameters as the uninterrupted run.
  state = trainer.train(config, workdir, task)
  assert int(state.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params),
               final)
  assert os.listdir(os.path.join(workdir, trainer.DAMAGED_DIR))
  assert trainer.restore(config, workdir, task).step == 4


def test_nothing_intact_fails_naming_each_step(run, tmp_path):
  source, _ = run
  workdir = str(tmp_path / "w")
  shutil.copytree(source, workdir)
  for step in (2, 4):
    for path in _data_files(workdir, step):
      truncate(path)
  config = _config()
  with pytest.raises(ValueError, match=r"No intact checkpoint.*step 4: .*"
                     r"step 2: .*Load another step \(step=N"):
    trainer.restore(config, workdir, toy_task.ToyTask(config))


def test_checksums_see_one_changed_value():
  params = {"a": np.arange(6, dtype=np.float32).reshape(2, 3),
            "b": {"c": np.ones(4, np.int32)}}
  expected = checkpoints.params_checksum(params)
  checkpoints.check_params(params, expected, "here")
  params["a"][1, 2] += 1e-6
  with pytest.raises(ValueError, match=r"here: .* checksum .*\(1 of 2 arrays differ\)"):
    checkpoints.check_params(params, expected, "here")
  params["a"][0, 0] = np.nan
  with pytest.raises(ValueError, match="NaN or Inf"):
    checkpoints.check_params(params, None, "here")
