"""A tiny regression task for trainer tests: a 2-layer MLP fitting y = x·w.

Params are boxed with logical names; the data is a deterministic grain
pipeline (example i is a function of i) with a string entry the trainer must
drop; `nan_batches` poisons the loss on those batch indices.
"""
import os
import signal
import sys

import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import parallel

IN_DIM = 8
HIDDEN = 16


def make_config(**overrides) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.task = "toy"
  config.seed = 0
  config.total_steps = 8
  config.log_every_steps = 2
  config.checkpoint_every_steps = 3
  config.keep_checkpoints = 2
  config.eval_every_steps = 0
  config.max_consecutive_nonfinite = 3
  config.optimizer = ml_collections.ConfigDict(dict(
      lr=3e-2, warmup_steps=1, end_lr_fraction=0.1, b1=0.9, b2=0.99,
      eps=1e-8, weight_decay=1e-4, grad_clip_norm=1.0))
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=2, tensor=2))
  config.logical_axis_rules = parallel.STANDARD_RULES
  config.model = ml_collections.ConfigDict(dict(hidden=HIDDEN))
  config.data = ml_collections.ConfigDict(dict(batch_size=8, size=4096))
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


class ToyMlp(nn.Module):
  hidden: int = HIDDEN

  @nn.compact
  def __call__(self, x):  # x: [B, IN_DIM]
    x = nn.with_logical_constraint(x, ("act_batch", "act_embed"))
    h = nn.Dense(
        self.hidden,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               ("mlp",)))(x)  # [B, H]
    h = nn.gelu(h)
    return nn.Dense(
        1,
        kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", None)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros,
                                               (None,)))(h)[:, 0]  # [B]


def _example(index: int):
  rng = np.random.default_rng(index)
  x = rng.normal(size=(IN_DIM,)).astype(np.float32)
  w = np.linspace(-1.0, 1.0, IN_DIM, dtype=np.float32)
  return {"x": x, "y": np.float32(x @ w), "index": np.int32(index),
          "caption": f"example {index}"}


class ToyTask:
  """Implements the Task interface; optional hooks record what they saw."""

  def __init__(self, config, *, nan_batches=(), record_params=False,
               sigterm_at_step=None):
    self.config = config
    self.model = ToyMlp(**config.model)
    self.nan_batches = jnp.asarray(tuple(nan_batches) or (-1,), jnp.int32)
    self.record_params = record_params
    self.sigterm_at_step = sigterm_at_step
    self.recorded = {}

  def train_data(self, process_index, process_count):
    # Each host reads its slice of every global batch, so a run on several
    # processes sees the same global batches as a run on one.
    batch_size = self.config.data.batch_size
    if batch_size % process_count:
      raise ValueError(f"config.data.batch_size={batch_size} is not divisible "
                       f"by the {process_count} processes.")
    local = batch_size // process_count
    start = process_index * local
    return (grain.MapDataset.range(self.config.data.size)
            .map(_example)
            .batch(batch_size, drop_remainder=True)
            .map(lambda b: {k: v[start:start + local] for k, v in b.items()})
            .repeat(None)
            .to_iter_dataset())

  def init(self, rng, batch):
    params = self.model.init(rng, batch["x"])["params"]
    return params, {"updates": jnp.zeros((), jnp.int32)}

  def loss(self, params, model_state, batch, rng):
    del rng
    pred = self.model.apply({"params": params}, batch["x"])  # [B]
    mse = jnp.mean((pred - batch["y"]) ** 2)
    batch_index = batch["index"][0] // self.config.data.batch_size
    poison = jnp.where(jnp.isin(batch_index, self.nan_batches), jnp.nan, 0.0)
    new_state = {"updates": model_state["updates"] + 1}
    return mse + poison, ({"mse": mse}, new_state)

  def evaluate(self, params, model_state, workdir, step):
    del workdir
    if self.record_params:
      self.recorded[step] = (jax.tree.map(np.asarray, params),
                             int(model_state["updates"]))
    if self.sigterm_at_step == step:
      os.kill(os.getpid(), signal.SIGTERM)
    return {"param_sq": float(sum(jnp.sum(p ** 2)
                                  for p in jax.tree.leaves(params)))}


def main(argv):
  """`python toy_task.py WORKDIR SIGTERM_STEP [key=int ...]`: a run that
  receives SIGTERM at SIGTERM_STEP (from its own eval hook)."""
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from unimm.train import trainer
  workdir, sigterm_step = argv[1], int(argv[2])
  overrides = dict(kv.split("=") for kv in argv[3:])
  config = make_config(**{k: int(v) for k, v in overrides.items()})
  state = trainer.train(config, workdir,
                        ToyTask(config, sigterm_at_step=sigterm_step))
  print(f"STOPPED_AT {int(state.step)}")


if __name__ == "__main__":
  main(sys.argv)
