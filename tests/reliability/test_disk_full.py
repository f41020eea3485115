"""A full disk: one error saying so and where, the checkpoints saved
before it intact, and the same command resuming once there is space.

The disk is filled by fault injection (a tmpfs mount needs privileges a CI
runner may lack): the checkpoint writer fails the way TensorStore reports
it, and a metrics write the way Python does.
"""
import errno
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from unimm import errors
from unimm.train import trainer

HERE = os.path.dirname(__file__)
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import toy_task  # noqa: E402  pylint: disable=g-import-not-at-top


def _tensorstore_error(path):
  return ValueError(
      f'RESOURCE_EXHAUSTED: Error writing local file "{path}": Failed '
      f'writing: "{path}": Failed to write 577518 bytes to file 16: No space '
      "left on device [os_error_code='28']")


def _config():
  return toy_task.make_config(total_steps=4, checkpoint_every_steps=2,
                              keep_checkpoints=3, log_every_steps=2)


def test_disk_full_names_the_path_and_the_step_to_resume(tmp_path,
                                                        monkeypatch):
  workdir = str(tmp_path / "w")
  full_at = os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp",
                         "state", "_sharding")
  save = ocp.CheckpointManager.save

  def save_until_full(self, step, *args, **kwargs):
    if step == 4:
      try:
        raise OSError(errno.EIO, "the write failed")
      except OSError as cause:  # chained, as orbax's threads report it
        raise RuntimeError("Save failed") from _tensorstore_error(full_at)
    return save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save_until_full)
  config = _config()
  with pytest.raises(errors.DiskFullError) as raised:
    trainer.train(config, workdir, toy_task.ToyTask(config))
  error = raised.value
  assert error.errno == errno.ENOSPC and error.filename == full_at
  assert str(error).startswith(f"No space left on device writing {full_at}")
  assert "steps [2] are intact" in str(error)
  assert "resumes from step 2" in str(error)
  assert error.__cause__ is None and error.__suppress_context__

  # Space again: the same call resumes from step 2, to the parameters of a
  # run that never stopped.
  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  resumed = trainer.train(config, workdir, toy_task.ToyTask(config))
  straight = trainer.train(config, str(tmp_path / "straight"),
                           toy_task.ToyTask(config))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(resumed.params),
               jax.device_get(straight.params))


def test_disk_full_finds_the_cause_in_a_chain():
  assert errors.disk_full(ValueError("other")) is None
  assert errors.disk_full(OSError(errno.ENOSPC, "full", "/x/y")) == "/x/y"
  try:
    try:
      raise _tensorstore_error("/w/checkpoints/9/d/abc")
    except ValueError:
      raise KeyError("while stopping")  # noqa: B904 (implicit chain)
  except KeyError as chained:
    assert errors.disk_full(chained) == "/w/checkpoints/9/d/abc"


def test_the_command_line_prints_one_line(tmp_path):
  """unimm.main on a full disk: rc 1, no traceback, the last line says it
  (the run itself is replaced by one that fails as the trainer does)."""
  script = textwrap.dedent(f"""
      import errno, sys
      from absl import app
      from unimm import errors, experiments, main
      def full(config, workdir):
        try:
          raise OSError(errno.ENOSPC, "No space left on device",
                        workdir + "/metrics.jsonl")
        except OSError:
          raise errors.DiskFullError(
              "No space left on device writing " + workdir +
              "/metrics.jsonl: free space", workdir) from None
      experiments.train_and_evaluate = full
      sys.argv = ["unimm.main", "--config=configs/vit_vqgan_shapes.py",
                  "--workdir={tmp_path}"]
      app.run(main.main, flags_parser=main._parse_flags)
      """)
  result = subprocess.run([sys.executable, "-c", script], cwd=ROOT,
                          capture_output=True, text=True, timeout=300,
                          check=False)
  assert result.returncode == 1, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last == (f"FATAL No space left on device writing {tmp_path}/"
                  "metrics.jsonl: free space")
