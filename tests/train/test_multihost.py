"""Two processes x 4 CPU devices on localhost train like one process x 8."""
import os
import re
import socket
import subprocess
import sys

import jax
import numpy as np

from unimm.train import trainer
from unimm.train import writers

import multihost_worker  # tests/train/multihost_worker.py
import toy_task


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _losses(workdir):
  return {r["step"]: r["loss"] for r in writers.read_metrics(workdir)
          if "loss" in r}


def test_two_processes_match_one_through_checkpoint_and_restore(tmp_path):
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
               UNIMM_NUM_PROCESSES="2", UNIMM_PROCESS_ID=str(process_id))
    procs.append(subprocess.Popen(
        [sys.executable, multihost_worker.__file__, multi_dir], env=env,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outputs = []
  for proc in procs:
    try:
      out, _ = proc.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for p in procs:
        p.kill()
      raise
    outputs.append(out)
    assert proc.returncode == 0, out[-4000:]
  for process_id, out in enumerate(outputs):
    assert f"PROCESS {process_id} DONE AT STEP 6" in out, out[-2000:]

  # The same schedule in this process on 8 devices.
  for total_steps in (4, 6):
    config = toy_task.make_config(total_steps=total_steps,
                                  **multihost_worker.RUN)
    state = trainer.train(config, single_dir, toy_task.ToyTask(config))
  assert jax.device_count() == 8

  # One set of checkpoints, written together by both hosts; each host saved
  # its own data-iterator position.
  manager = trainer.checkpoint_manager(multi_dir, read_only=True)
  assert list(manager.all_steps()) == [4, 6]  # keep_checkpoints=2
  manager.close()
  data_dir = os.path.join(multi_dir, "checkpoints", "6", "data")
  assert sorted(f for f in os.listdir(data_dir) if f.endswith(".json")) == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # Metrics come from process 0 only: one record per logged step.
  multi, single = _losses(multi_dir), _losses(single_dir)
  assert sorted(multi) == sorted(single) == [2, 4, 6]
  for step in multi:
    np.testing.assert_allclose(multi[step], single[step], rtol=1e-5)

  final = np.load(os.path.join(multi_dir, "final_params.npz"))
  expected = {jax.tree_util.keystr(path): np.asarray(x) for path, x in
              jax.tree_util.tree_leaves_with_path(state.params)}
  assert sorted(final.files) == sorted(expected)
  for name, value in expected.items():
    np.testing.assert_allclose(final[name], value, rtol=1e-5, atol=1e-6)
