"""Trainer: learning, exact resume after SIGTERM, non-finite steps, outputs."""
import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import optax
import pytest

from unimm import parallel
from unimm.train import optim
from unimm.train import trainer
from unimm.train import writers

import toy_task  # tests/train/toy_task.py (pytest puts this dir on sys.path)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def _assert_trees_equal(a, b):
  for x, y in zip(_leaves(a), _leaves(b), strict=True):
    assert np.array_equal(x, y)


def test_loss_falls_and_metrics_are_written(tmp_path):
  config = toy_task.make_config(total_steps=30, log_every_steps=10,
                                checkpoint_every_steps=30)
  state = trainer.train(config, str(tmp_path), toy_task.ToyTask(config))
  assert int(state.step) == 30
  assert int(state.model_state["updates"]) == 30
  # Sharded as the logical rules say: kernel [embed, mlp] -> (fsdp, tensor).
  assert state.params["Dense_0"]["kernel"].sharding.spec == jax.P("fsdp", "tensor")

  records = [r for r in writers.read_metrics(str(tmp_path)) if "loss" in r]
  assert [r["step"] for r in records] == [10, 20, 30]
  assert records[-1]["loss"] < 0.5 * records[0]["loss"]
  for r in records:
    assert r["steps_per_sec"] > 0 and r["examples_per_sec"] > 0
    assert r["grad_norm"] > 0 and r["nonfinite_count"] == 0
    assert r["mse"] == pytest.approx(r["loss"])
  assert records[0]["learning_rate"] > records[-1]["learning_rate"] > 0
  assert glob.glob(str(tmp_path / "tensorboard" / "events.out.tfevents.*"))


def test_sigterm_then_resume_is_bit_identical(tmp_path):
  overrides = dict(total_steps=8, checkpoint_every_steps=3, keep_checkpoints=2,
                   eval_every_steps=5)
  config = toy_task.make_config(**overrides)
  workdir_a, workdir_b = str(tmp_path / "a"), str(tmp_path / "b")
  state_a = trainer.train(config, workdir_a, toy_task.ToyTask(config))

  # Run B gets a real SIGTERM at step 5 (sent by its own eval hook).
  env = dict(os.environ)
  result = subprocess.run(
      [sys.executable, toy_task.__file__, workdir_b, "5"]
      + [f"{k}={v}" for k, v in overrides.items()],
      env=env, capture_output=True, text=True, timeout=120)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "STOPPED_AT 5" in result.stdout
  manager = trainer.checkpoint_manager(workdir_b, read_only=True)
  assert list(manager.all_steps()) == [3, 5]  # Saved on SIGTERM; keep 2.
  manager.close()
  with open(os.path.join(workdir_b, "checkpoints", "5", "data",
                         "process_0-of-1.json")) as f:
    assert json.load(f) == {"next_index": 5}  # 5 batches consumed.

  state_b = trainer.train(config, workdir_b, toy_task.ToyTask(config))
  assert int(state_b.step) == 8
  _assert_trees_equal(state_a.params, state_b.params)
  _assert_trees_equal(state_a.opt_state, state_b.opt_state)
  assert int(state_b.model_state["updates"]) == 8
  manager = trainer.checkpoint_manager(workdir_b, read_only=True)
  assert list(manager.all_steps()) == [6, 8]
  manager.close()

  restored = trainer.restore(config, workdir_b, toy_task.ToyTask(config))
  assert restored.step == 8
  assert restored.saved_config["total_steps"] == 8
  _assert_trees_equal(restored.params, state_a.params)
  assert (restored.params["Dense_0"]["kernel"].sharding
          == state_a.params["Dense_0"]["kernel"].sharding)


def test_nonfinite_steps_are_skipped_and_counted(tmp_path):
  # Batches 3 and 4 (steps 4 and 5) have a NaN loss.
  config = toy_task.make_config(total_steps=7, eval_every_steps=1,
                                checkpoint_every_steps=1, keep_checkpoints=10)
  task = toy_task.ToyTask(config, nan_batches=(3, 4), record_params=True)
  state = trainer.train(config, str(tmp_path), task)
  params, updates = {s: p for s, (p, _) in task.recorded.items()}, {
      s: u for s, (_, u) in task.recorded.items()}
  _assert_trees_equal(params[4], params[3])
  _assert_trees_equal(params[5], params[3])
  assert not np.array_equal(_leaves(params[6])[0], _leaves(params[5])[0])
  assert [updates[s] for s in range(1, 8)] == [1, 2, 3, 3, 3, 4, 5]
  assert int(state.nonfinite_count) == 2
  assert int(state.consecutive_nonfinite) == 0
  records = [r for r in writers.read_metrics(str(tmp_path)) if "loss" in r]
  assert records[-1]["nonfinite_count"] == 2
  assert all(r["loss"] is not None for r in records)  # Finite steps only.


def test_consecutive_nonfinite_steps_stop_without_saving_them(tmp_path):
  config = toy_task.make_config(total_steps=20, checkpoint_every_steps=1,
                                keep_checkpoints=20,
                                max_consecutive_nonfinite=3)
  task = toy_task.ToyTask(config, nan_batches=range(2, 20))
  with pytest.raises(RuntimeError, match=r"step 5: 3 consecutive steps .*"
                     r"config\.optimizer\.lr"):
    trainer.train(config, str(tmp_path), task)
  manager = trainer.checkpoint_manager(str(tmp_path), read_only=True)
  assert list(manager.all_steps()) == [1, 2, 3, 4]
  manager.close()
  last_finite = trainer.restore(config, str(tmp_path), task, step=2)
  for step in (3, 4):
    restored = trainer.restore(config, str(tmp_path), task, step=step)
    assert all(np.isfinite(x).all() for x in _leaves(restored.params))
    _assert_trees_equal(restored.params, last_finite.params)


def test_bad_loop_settings_fail_before_compiling(tmp_path):
  config = toy_task.make_config(checkpoint_every_steps=0)
  with pytest.raises(ValueError, match=r"config\.checkpoint_every_steps=0"):
    trainer.train(config, str(tmp_path), toy_task.ToyTask(config))
  config = toy_task.make_config(**{"optimizer.warmup_steps": 100})
  with pytest.raises(ValueError, match=r"config\.optimizer\.warmup_steps=100"):
    trainer.train(config, str(tmp_path), toy_task.ToyTask(config))


def test_default_optimizer_schedule_and_decay_mask():
  opt = toy_task.make_config().optimizer
  opt.update(lr=1.0, warmup_steps=10, end_lr_fraction=0.1)
  schedule = optim.learning_rate_schedule(opt, 100)
  assert float(schedule(0)) == 0.0
  assert float(schedule(5)) == pytest.approx(0.5)
  assert float(schedule(10)) == pytest.approx(1.0)
  assert float(schedule(100)) == pytest.approx(0.1)
  assert float(schedule(55)) == pytest.approx(0.55, abs=1e-6)  # Cosine mid.
  params = {"kernel": np.ones((2, 2), np.float32),
            "bias": np.ones((2,), np.float32)}
  assert optim.decay_mask(params) == {"kernel": True, "bias": False}
  opt.update(weight_decay=0.5, grad_clip_norm=0.0, warmup_steps=0)
  tx = optim.make_optimizer(opt, 100)
  zero = {k: np.zeros_like(v) for k, v in params.items()}
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only weight decay moves the kernel; the bias stays.
  assert np.all(np.asarray(updates["kernel"]) < 0)
  assert np.all(np.asarray(updates["bias"]) == 0)
  opt.update(grad_clip_norm=1e-3)
  tx = optim.make_optimizer(opt, 100)
  assert isinstance(tx, optax.GradientTransformation)


class _HookedTask(toy_task.ToyTask):
  """Overrides the optimizer and adds an update_params hook."""

  def optimizer(self):
    return optax.sgd(0.05)

  def update_params(self, params, model_state, rng):
    del rng
    return params, {"updates": model_state["updates"] + 100}


def test_task_optimizer_and_update_params_hook(tmp_path):
  config = toy_task.make_config(total_steps=3, log_every_steps=3,
                                checkpoint_every_steps=3)
  state = trainer.train(config, str(tmp_path), _HookedTask(config))
  assert int(state.model_state["updates"]) == 3 * 101  # Hook ran each step.
  assert not jax.tree.leaves(state.opt_state)  # Plain SGD keeps no state.
  record = [r for r in writers.read_metrics(str(tmp_path)) if "loss" in r][-1]
  assert "learning_rate" not in record  # Unknown for a task's optimizer.


def test_restore_onto_another_mesh_and_one_device(tmp_path):
  """Saved on data=2,fsdp=2,tensor=2; restored on fsdp=8 and on one device
  with equal values; training resumes on tensor=8 and ends where a run that
  never changed mesh ends (up to the reduction order of the new layout)."""
  config = toy_task.make_config(total_steps=6, checkpoint_every_steps=6)
  saved = trainer.train(config, str(tmp_path), toy_task.ToyTask(config))
  assert saved.params["Dense_0"]["kernel"].sharding.mesh.shape == {
      "data": 2, "fsdp": 2, "tensor": 2}

  meshes = {
      "fsdp=8": parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1}),
      "one device": parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1},
                                       devices=jax.devices()[:1]),
  }
  for name, mesh in meshes.items():
    restored = trainer.restore(config, str(tmp_path), toy_task.ToyTask(config),
                               mesh=mesh)
    kernel = restored.params["Dense_0"]["kernel"]
    assert kernel.sharding.mesh.shape == mesh.shape, name
    assert len(kernel.sharding.device_set) == mesh.size, name
    _assert_trees_equal(restored.params, saved.params)

  # Continue training (optimizer state and data position restored too) on
  # another mesh, against continuing on the original one.
  more = dict(total_steps=9, checkpoint_every_steps=9)
  other = toy_task.make_config(**more, **{"mesh.data": 1, "mesh.fsdp": 1,
                                          "mesh.tensor": 8})
  moved = trainer.train(other, str(tmp_path),
                        toy_task.ToyTask(other))
  assert moved.params["Dense_0"]["kernel"].sharding.mesh.shape == {
      "data": 1, "fsdp": 1, "tensor": 8}
  # The same schedule (the learning rate depends on total_steps) without the
  # change of mesh.
  shutil.copytree(tmp_path / "checkpoints" / "6",
                  tmp_path / "ref" / "checkpoints" / "6")
  reference = toy_task.make_config(**more)
  uninterrupted = trainer.train(reference, str(tmp_path / "ref"),
                                toy_task.ToyTask(reference))
  for x, y in zip(_leaves(moved.params), _leaves(uninterrupted.params),
                  strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
