"""The optimizers of config.optimizer: Muon's split, updates and resume."""
import shutil

import jax
import numpy as np
import optax
import pytest

from jax.sharding import PartitionSpec as P

from unimm.train import optim
from unimm.train import trainer
from unimm.train import writers

import toy_task  # tests/train/toy_task.py (pytest puts this dir on sys.path)


def _muon_config(**overrides):
  opt = toy_task.make_config().optimizer
  opt.update(name="muon", lr=1.0, warmup_steps=0, end_lr_fraction=1.0,
             weight_decay=0.0, grad_clip_norm=0.0)
  opt.update(overrides)
  return opt


def test_muon_finds_the_hidden_matrices_by_logical_names():
  dims = optim.muon_dimension_numbers
  # Reads the residual stream: "embed" is the reduction axis.
  assert dims(("embed", "heads", "head_dim")) == (0, (1, 2))
  assert dims(("embed", "mlp")) == (0, (1,))
  # Writes it: "embed" is the output axis; a scanned "layers" axis batches.
  assert dims(("heads", "head_dim", "embed")) == ((0, 1), 2)
  assert dims(("layers", "mlp", "embed")) == ((1,), 2)
  # Embeddings, the output layer, position tables, norms, patch projections.
  for names in (("vocab", "embed"), ("embed", "vocab"), (None, "embed"),
                ("norm",), ("patch", "embed"), ("embed",), ()):
    assert dims(names) is None, names


def test_muon_orthogonalises_hidden_updates_and_adam_takes_the_rest():
  rng = np.random.default_rng(0)
  params = {"hidden": rng.normal(size=(32, 64)).astype(np.float32),
            "embedding": rng.normal(size=(10, 32)).astype(np.float32),
            "bias": rng.normal(size=(64,)).astype(np.float32)}
  names = {"hidden": P("embed", "mlp"), "embedding": P("vocab", "embed"),
           "bias": P("mlp")}
  grads = jax.tree.map(
      lambda p: rng.normal(size=p.shape).astype(np.float32) *
      np.linspace(0.1, 3.0, p.shape[-1], dtype=np.float32), params)
  tx = optim.make_optimizer(_muon_config(), 10, param_names=names)
  updates, _ = tx.update(grads, tx.init(params), params)
  # Muon: the update's singular values are nearly equal (Newton-Schulz
  # orthogonalisation), unlike the gradient's.
  s_update = np.linalg.svd(np.asarray(updates["hidden"]), compute_uv=False)
  s_grad = np.linalg.svd(grads["hidden"], compute_uv=False)
  assert s_grad.max() / s_grad.min() > 4
  assert s_update.max() / s_update.min() < 2
  # AdamW's first step moves every entry by the same amount, about lr
  # (1.0; optax's Nesterov momentum in Muon's AdamW half makes it
  # 1 + b1 (1 - b1) / (1 - b1^2) = 1.47)
  # against its gradient, whatever the gradient's size.
  for name in ("embedding", "bias"):
    step = -np.asarray(updates[name]) * np.sign(grads[name])
    np.testing.assert_allclose(step, step.flat[0], rtol=1e-4, err_msg=name)
    assert 0.5 < step.flat[0] < 2.0, name


def test_bad_optimizer_settings_name_the_setting():
  with pytest.raises(ValueError, match=r"config\.optimizer\.name='lion'"):
    optim.make_optimizer(_muon_config(name="lion"), 10)
  with pytest.raises(ValueError, match="needs the parameters' logical"):
    optim.make_optimizer(_muon_config(), 10)
  with pytest.raises(ValueError, match="no hidden-layer matrix"):
    optim.make_optimizer(_muon_config(), 10,
                         param_names={"embedding": P("vocab", "embed")})


@pytest.mark.parametrize("name", ["adamw", "muon"])
def test_lr_scales_scale_one_module_s_updates(name):
  """config.optimizer.lr_scales: the updates of the parameters under the
  named module are the factor times the unscaled optimizer's (a learning
  rate of their own); the others are unchanged."""
  rng = np.random.default_rng(1)
  params = {"selector": {"kernel": rng.normal(size=(16, 32)).astype(
      np.float32), "bias": rng.normal(size=(32,)).astype(np.float32)},
            "encoder": {"kernel": rng.normal(size=(16, 32)).astype(
                np.float32)}}
  names = {"selector": {"kernel": P("embed", "mlp"), "bias": P("mlp")},
           "encoder": {"kernel": P("embed", "mlp")}}
  grads = jax.tree.map(lambda p: rng.normal(size=p.shape).astype(
      np.float32), params)
  config = _muon_config(name=name, weight_decay=0.1)

  def updates(opt_config):
    tx = optim.make_optimizer(opt_config, 10, param_names=names)
    state = tx.init(params)
    for _ in range(2):  # the second step has momentum
      out, state = tx.update(grads, state, params)
    return out

  plain = updates(config)
  scaled = updates(_muon_config(name=name, weight_decay=0.1,
                                lr_scales={"selector": 0.1}))
  for key in ("kernel", "bias"):
    np.testing.assert_allclose(scaled["selector"][key],
                               0.1 * np.asarray(plain["selector"][key]),
                               rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(scaled["encoder"]["kernel"],
                                plain["encoder"]["kernel"])
  with pytest.raises(ValueError, match="lr_scales names 'selecter'"):
    updates(_muon_config(name=name, lr_scales={"selecter": 0.1}))
  with pytest.raises(ValueError, match="positive factor"):
    optim.make_optimizer(_muon_config(name=name, lr_scales={"selector": 0}),
                         10, param_names=names)


def _leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_muon_trains_on_a_sharded_mesh_and_resumes_bit_identical(tmp_path):
  # The toy MLP's first kernel is ("embed", "mlp"): Muon, sharded over the
  # fsdp x tensor mesh; its second is ("mlp", None): AdamW.
  config = toy_task.make_config(total_steps=12, checkpoint_every_steps=6,
                                keep_checkpoints=3, log_every_steps=1)
  config.optimizer.update(name="muon", lr=0.1)
  workdir_a, workdir_b = str(tmp_path / "a"), str(tmp_path / "b")
  state_a = trainer.train(config, workdir_a, toy_task.ToyTask(config))
  muon_states = [s for s in jax.tree.leaves(
      state_a.opt_state, is_leaf=lambda x: isinstance(x, optax.contrib.MuonState))
                 if isinstance(s, optax.contrib.MuonState)]
  assert muon_states, "Muon was not used"
  losses = [r["loss"] for r in writers.read_metrics(workdir_a) if "loss" in r]
  assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4])  # Batches vary.

  # Run B resumes from A's step-6 checkpoint (MaskedNode leaves included).
  shutil.copytree(workdir_a, workdir_b)
  shutil.rmtree(f"{workdir_b}/checkpoints/12")
  state_b = trainer.train(config, workdir_b, toy_task.ToyTask(config))
  assert int(state_b.step) == 12
  for x, y in zip(_leaves((state_a.params, state_a.opt_state)),
                  _leaves((state_b.params, state_b.opt_state)), strict=True):
    assert np.array_equal(x, y)
