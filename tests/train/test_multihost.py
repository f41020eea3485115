"""Two processes x 4 CPU devices on localhost: the toy task trains like one
process x 8 through checkpoint and restore; a real task (the diffusion
de-tokenizer, each host reading its share of the image pipeline) trains,
restores and evaluates on both hosts with the parameters gathered."""
import json
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

import unimm
from unimm.tokenizers import losses as losses_lib
from unimm.train import trainer
from unimm.train import writers
from unimm.train.detokenizer_task import DetokenizerTask

import multihost_worker  # tests/train/multihost_worker.py

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "data"))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir)
          if "loss" in r}


@pytest.fixture(scope="module")
def detokenizer_files(tmp_path_factory):
  files = test_pretokenize.tokenizer_files(tmp_path_factory, "multihost")
  return files["tokenizer_workdir"], files["data_dir"]


# The real task takes 80-90 s of CPU: slow (docs/testing.md); the toy task
# runs every time.
@pytest.mark.parametrize(
    "task", ["toy", pytest.param("detokenizer", marks=pytest.mark.slow)])
def test_two_processes_train_through_checkpoint_restore_and_eval(
    task, tmp_path, request):
  real = (None if task == "toy"
          else request.getfixturevalue("detokenizer_files"))
  multi_dir, single_dir = str(tmp_path / "multi"), str(tmp_path / "single")
  port = _free_port()
  procs = []
  for process_id in range(2):
    env = dict(os.environ,
               XLA_FLAGS=re.sub(  # the suite's flags, 4 devices
                   r"--xla_force_host_platform_device_count=\d+",
                   "--xla_force_host_platform_device_count=4",
                   os.environ.get("XLA_FLAGS", "")),
               JAX_PLATFORMS="cpu",
               UNIMM_COORDINATOR_ADDRESS=f"localhost:{port}",
               UNIMM_NUM_PROCESSES="2", UNIMM_PROCESS_ID=str(process_id),
               PYTHONPATH=os.pathsep.join(
                   [HERE, os.path.join(HERE, "..", "data"),
                    os.environ.get("PYTHONPATH", "")]))
    procs.append(subprocess.Popen(
        [sys.executable, multihost_worker.__file__, multi_dir,
         *(real or ())], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=400)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(out)
    assert proc.returncode == 0, out[-4000:]
  for process_id, out in enumerate(outputs):
    assert f"PROCESS {process_id} DONE AT STEP 6" in out, out[-2000:]

  # One set of checkpoints, written together by both hosts; each host saved
  # its own data-iterator position.
  manager = trainer.checkpoint_manager(multi_dir, read_only=True)
  assert list(manager.all_steps()) == [4, 6]  # keep_checkpoints=2
  manager.close()
  data_dir = os.path.join(multi_dir, "checkpoints", "6", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]
  final = np.load(os.path.join(multi_dir, "final_params.npz"))
  if real:
    _check_real_run(multi_dir, final)
    return

  # The same schedule in this process on 8 devices.
  for total_steps in (4, 6):
    state = multihost_worker.run(single_dir, total_steps)
  assert jax.device_count() == 8

  # Metrics come from process 0 only: one record per logged step.
  multi, single = _losses(multi_dir), _losses(single_dir)
  assert sorted(multi) == sorted(single) == [2, 4, 6]
  for step in multi:
    np.testing.assert_allclose(multi[step], single[step], rtol=1e-5)

  expected = {jax.tree_util.keystr(path): np.asarray(x) for path, x in
              jax.tree_util.tree_leaves_with_path(state.params)}
  assert sorted(final.files) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6)


def _check_real_run(workdir, final):
  """The de-tokenizer's two hosts each read their own share of the image
  pipeline (so its batches, unlike the toy task's, are not one process's):
  the run logs finite losses, and its eval, run on both hosts with the
  parameters gathered from both, is what this process computes from the
  saved checkpoint."""
  losses = _losses(workdir)
  assert sorted(losses) == [2, 4, 6]
  assert all(np.isfinite(v) for v in losses.values())
  detok = unimm.load_detokenizer(workdir)
  assert detok.step == 6
  saved = {jax.tree_util.keystr(path): np.asarray(x) for path, x in
           jax.tree_util.tree_leaves_with_path(detok.params)}
  assert sorted(saved) == sorted(final.files)
  for name, value in saved.items():
    np.testing.assert_array_equal(final[name], value)
  with open(os.path.join(workdir, "eval", "report.json")) as f:
    report = json.load(f)
  data = DetokenizerTask(detok.config)._dataset(  # pylint: disable=protected-access
      "test", 8, shuffle=False, num_epochs=1, drop_remainder=False)
  images = np.asarray(next(iter(data))["image"])[:report["num_images"]]
  psnr = losses_lib.psnr_uint8(
      detok.reconstruct(images, seed=0, batch_size=8), images).mean()
  np.testing.assert_allclose(report["psnr"], psnr, rtol=1e-5)
