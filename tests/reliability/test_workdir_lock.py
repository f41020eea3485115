"""One run per workdir: a second run fails at once naming the first; a
stale lock is taken over; an unfinished final evaluation reruns."""
import json
import os
import subprocess
import sys
import time

import pytest

from unimm.train import trainer
from unimm.train import workdir_lock

HERE = os.path.dirname(__file__)
sys.path.insert(0, os.path.join(HERE, "..", "train"))
import toy_task  # noqa: E402  pylint: disable=g-import-not-at-top


def test_a_second_run_on_a_held_workdir_fails_naming_the_first(tmp_path):
  workdir = str(tmp_path / "w")
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; "
       "from unimm.train import workdir_lock; "
       "path = workdir_lock.acquire(sys.argv[1]); print(path, flush=True); "
       "time.sleep(60)", workdir],
      stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip().endswith("LOCK")
    config = toy_task.make_config(total_steps=2)
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=rf"in use by another run: "
                       rf"process {holder.pid} on host"):
      trainer.train(config, workdir, toy_task.ToyTask(config))
    assert time.monotonic() - start < 5  # at once, nothing compiled
    assert not os.path.exists(os.path.join(workdir, "checkpoints"))
  finally:
    holder.kill()
    holder.wait()
  # The holder died without releasing: its lock is stale and taken over.
  with workdir_lock.hold(workdir) as path:
    with open(path) as f:
      assert json.load(f)["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match="already holds"):
      workdir_lock.acquire(workdir)
  assert not os.path.exists(path)  # released at exit


def test_a_final_evaluation_that_did_not_finish_reruns(tmp_path):
  config = toy_task.make_config(total_steps=2)
  workdir = str(tmp_path / "w")
  task = toy_task.ToyTask(config)
  calls = []
  evaluate = task.evaluate
  task.evaluate = lambda *a: calls.append(a[-1]) or evaluate(*a)
  trainer.train(config, workdir, task)
  assert calls == [2]
  trainer.train(config, workdir, task)  # finished: nothing to do
  assert calls == [2]
  os.remove(os.path.join(workdir, trainer.EVALUATED_FILE))  # killed in it
  trainer.train(config, workdir, task)
  assert calls == [2, 2]
