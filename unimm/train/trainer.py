"""The training loop shared by every task.

The trainer owns the mesh, sharding, the jitted step, checkpoints, metrics,
non-finite-step handling and preemption; a task (unimm.train.tasks) owns the
model, its data and its loss:

  task.train_data(process_index, process_count) -> grain.IterDataset
  task.init(rng, batch) -> (params, model_state)          # boxed params
  task.loss(params, model_state, batch, rng)
      -> (loss, (metrics, new_model_state))
  task.update_params(params, model_state, rng) -> (params, model_state)  # opt.
  task.optimizer() -> optax.GradientTransformation | None               # opt.
  task.evaluate(params, model_state, workdir, step) -> dict             # opt.

Init follows flax/examples/lm1b: jax.eval_shape -> logical partition specs
-> shardings -> jax.jit(init, out_shardings=...); the state the step sees
holds plain (unboxed) arrays. The step is
jax.jit(step, in_shardings, out_shardings, donate_argnums=0), traced under
jax.set_mesh(mesh) and the config's logical axis rules.
"""
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from typing import Any, Mapping

from absl import logging
from clu import metric_writers
from clu import periodic_actions
from etils import epath
import flax
import flax.linen as nn
import grain
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from unimm import checkpoints
from unimm import errors
from unimm import parallel
from unimm import paths
from unimm.evaluation import reports
from unimm.train import optim
from unimm.train import workdir_lock
from unimm.train import writers

CHECKPOINT_DIR = checkpoints.CHECKPOINT_DIR
# Where damaged checkpoints are moved when a run resumes before them.
DAMAGED_DIR = "damaged_checkpoints"
# Written when an evaluation has finished: {"step": N}.
EVALUATED_FILE = os.path.join("eval", "evaluated_step.json")


@flax.struct.dataclass
class TrainState:
  """Everything a training step reads and writes (plain, sharded arrays)."""
  step: jax.Array                   # int32 []: optimizer steps taken
  params: Any
  opt_state: Any
  model_state: Any                  # non-trained arrays (e.g. EMA, counters)
  rng: jax.Array                    # uint32 [2]; step keys = fold_in(rng, step)
  nonfinite_count: jax.Array        # int32 []: skipped steps so far
  consecutive_nonfinite: jax.Array  # int32 []: skipped steps in a row


Restored = checkpoints.Restored


# ----------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------


def _check_config(config: ml_collections.ConfigDict) -> None:
  """Fails before any compile on loop settings that cannot work."""
  positive = ("total_steps", "log_every_steps", "checkpoint_every_steps",
              "keep_checkpoints", "max_consecutive_nonfinite")
  for name in positive:
    value = config.get(name)
    if not isinstance(value, int) or value <= 0:
      raise ValueError(f"config.{name}={value!r} must be a positive integer.")
  eval_every = config.get("eval_every_steps", 0)
  if not isinstance(eval_every, int) or eval_every < 0:
    raise ValueError(f"config.eval_every_steps={eval_every!r} must be an "
                     "integer >= 0 (0 turns evaluation off).")


_rules = checkpoints.rules_of


# ----------------------------------------------------------------------------
# Batches.
# ----------------------------------------------------------------------------


def _is_text(x) -> bool:
  return isinstance(x, np.ndarray) and x.dtype.kind in "OSU"


def device_batch(batch: Any) -> Any:
  """Drops string entries (e.g. raw captions): jax arrays hold numbers only."""
  if isinstance(batch, Mapping):
    return {k: device_batch(v) for k, v in batch.items() if not _is_text(v)}
  return batch


def _batch_spec(abstract_batch: Any) -> Any:
  """JSON description of the global batch (what restore() gives task.init)."""
  return jax.tree.map(lambda x: {"shape": list(x.shape),
                                 "dtype": str(np.dtype(x.dtype))},
                      abstract_batch)




def _global_abstract(local_batch: Any, sharding, process_count: int) -> Any:
  """Global ShapeDtypeStructs of a per-host numpy batch."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(
          (x.shape[0] * process_count,) + tuple(x.shape[1:]), x.dtype,
          sharding=sharding), local_batch)


# ----------------------------------------------------------------------------
# Optimizer and abstract state.
# ----------------------------------------------------------------------------


def _optimizer(config, task, abstract_batch
               ) -> tuple[optax.GradientTransformation, optax.Schedule | None]:
  """The task's optimizer if it defines one, else AdamW / Muon from
  config.optimizer (Muon reads the parameters' logical axis names from an
  abstract init on abstract_batch; call under the mesh and rules).

  The schedule (for logging the learning rate) is known for the default only.
  """
  make = getattr(task, "optimizer", None)
  tx = make() if callable(make) else None
  if tx is not None:
    return tx, None
  param_names = None
  if config.optimizer.get("name", "adamw") == "muon":
    boxed_params, _ = jax.eval_shape(task.init, jax.random.PRNGKey(0),
                                     abstract_batch)
    param_names = parallel.logical_specs(boxed_params)
  return (optim.make_optimizer(config.optimizer, config.total_steps,
                               param_names),
          optim.learning_rate_schedule(config.optimizer, config.total_steps))


def _make_init(task, tx):
  """init(rng, batch) -> TrainState whose params/opt state are still boxed.

  tx.init maps over the boxed params, so optimizer leaves that mirror a
  parameter (Adam's mu, nu) inherit its logical names; scalars (counts) are
  plain and end up replicated.
  """

  def init(rng, batch):
    init_rng, train_rng = jax.random.split(rng)
    params, model_state = task.init(init_rng, batch)
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=parallel.drop_empty_boxes(tx.init(params)),
        model_state=model_state,
        rng=train_rng,
        nonfinite_count=jnp.zeros((), jnp.int32),
        consecutive_nonfinite=jnp.zeros((), jnp.int32))

  return init


def _state_dict(state: TrainState) -> dict[str, Any]:
  """TrainState as a plain dict (the checkpoint layout)."""
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


# ----------------------------------------------------------------------------
# Checkpoints.
# ----------------------------------------------------------------------------


checkpoint_manager = checkpoints.checkpoint_manager


def _restore_args(abstract_tree):
  return ocp.checkpoint_utils.construct_restore_args(abstract_tree)


def _all_finite(tree) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


class _Checkpointer:
  """Saves state + data iterator + config together; never a non-finite state."""

  def __init__(self, workdir, config, batch_spec, dependencies=None):
    self.manager = checkpoint_manager(workdir, keep=config.keep_checkpoints)
    self._workdir = workdir
    self._config = json.loads(config.to_json_best_effort())
    self._config_dict = config
    # Where the run started: relative paths in its config resolve from any
    # working directory (checkpoints.resolve_path).
    self._meta = {"batch_spec": batch_spec, "cwd": os.getcwd(),
                  "workdir": paths.absolute(workdir),
                  "dependencies": dict(dependencies or {})}
    self._finite = jax.jit(lambda s: _all_finite((s.params, s.model_state)))
    self.last_saved_step = self.manager.latest_step()

  def save(self, step: int, state: TrainState, data_iterator) -> None:
    if self.last_saved_step == step:
      return
    if not bool(self._finite(state)):
      # The step skips non-finite updates, so this cannot happen.
      raise RuntimeError(f"Refusing to save step {step}: its parameters are "
                         "not finite.")
    logging.info("Saving checkpoint at step %d.", step)
    self.manager.save(step, force=True, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(_state_dict(state)),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        config=ocp.args.JsonSave(self._config),
        meta=ocp.args.JsonSave(dict(
            self._meta,
            params_checksum=checkpoints.params_checksum(state.params)))))
    self.last_saved_step = step

  def restore(self, step: int, abstract_state: TrainState, data_iterator):
    """The state (and data position) of checkpoint `step`, checked against
    the checksum saved with it (ValueError if damaged)."""
    abstract = _state_dict(abstract_state)
    checkpoints.check_checkpoint_tree(self.manager, step, abstract,
                                      self._workdir, config=self._config_dict)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract, restore_args=_restore_args(abstract)),
        data=grain.checkpoint.CheckpointRestore(data_iterator),
        meta=ocp.args.JsonRestore()))
    checkpoints.check_params(
        restored["state"]["params"],
        (restored["meta"] or {}).get("params_checksum"),
        f"The checkpoint at step {step} in {self._workdir}")
    return TrainState(**restored["state"])

  def restore_intact(self, abstract_state: TrainState, data_iterator
                     ) -> TrainState | None:
    """The newest intact checkpoint's state (None without checkpoints); a
    damaged one is named and skipped (checkpoints.intact_step)."""
    steps = list(self.manager.all_steps())
    if not steps:
      return None
    step, state = checkpoints.intact_step(
        self._workdir,
        lambda s: self.restore(s, abstract_state, data_iterator), None, steps)
    damaged = [s for s in steps if s > step]
    if damaged and jax.process_index() == 0:
      # Out of orbax's sight (training goes on from `step` and saves those
      # steps anew), kept for inspection.
      aside = epath.Path(self._workdir, DAMAGED_DIR)
      aside.mkdir(parents=True, exist_ok=True)
      for s in damaged:
        epath.Path(self.manager.directory, str(s)).rename(
            aside / f"{s}-{int(time.time())}")
        logging.warning("Moved the damaged checkpoint %d to %s.", s, aside)
    if damaged:
      multihost_utils.sync_global_devices("unimm_damaged_checkpoints")
      self.manager.reload()
    self.last_saved_step = step
    logging.info("Resuming from the checkpoint at step %d.", step)
    return state

  def close(self):
    self.manager.wait_until_finished()
    self.manager.close()


# ----------------------------------------------------------------------------
# Signals / preemption.
# ----------------------------------------------------------------------------


class _StopRequest:
  """SIGTERM / SIGINT set a flag; the loop saves and returns at a step end.

  With several processes every host must stop at the same step: JAX's
  preemption service (via orbax's reached_preemption) handles SIGTERM, and a
  local SIGINT is shared with the other hosts at log steps.
  """

  def __init__(self, manager: ocp.CheckpointManager):
    self._manager = manager
    self.requested = False
    self._previous = {}
    self._multi = jax.process_count() > 1

  def __enter__(self):
    if threading.current_thread() is not threading.main_thread():
      logging.warning("Not on the main thread: SIGTERM/SIGINT will not "
                      "trigger a checkpoint.")
      return self
    signals = [signal.SIGINT] if self._multi else [signal.SIGTERM,
                                                   signal.SIGINT]
    for sig in signals:
      self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)
    self._previous = {}

  def _handle(self, signum, frame):
    del frame
    if self.requested and signum == signal.SIGINT:
      raise KeyboardInterrupt  # A second Ctrl-C stops without saving.
    self.requested = True
    logging.warning("Received %s: saving a checkpoint at the end of this "
                    "step, then stopping.", signal.Signals(signum).name)

  def should_stop(self, step: int, sync_local: bool) -> bool:
    if not self._multi:
      return self.requested
    if self._manager.reached_preemption(step):
      return True
    if sync_local:
      flags = multihost_utils.process_allgather(np.array(self.requested))
      return bool(np.any(flags))
    return False


# ----------------------------------------------------------------------------
# The step.
# ----------------------------------------------------------------------------


def _make_train_step(task, tx):
  """step(state, batch) -> (state, metrics); non-finite updates are skipped."""
  update_hook = getattr(task, "update_params", None)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(state.rng, state.step)
    loss_rng, update_rng = jax.random.split(rng)

    def loss_fn(params):
      return task.loss(params, state.model_state, batch, loss_rng)

    (loss, (metrics, model_state)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if update_hook is not None:
      params, model_state = update_hook(params, model_state, update_rng)

    grad_norm = optax.tree.norm(grads)
    finite = (jnp.isfinite(loss) & jnp.isfinite(grad_norm)
              & _all_finite((params, model_state)))

    def keep_if_finite(new, old):
      # Skip the whole update (params, optimizer moments, model state) on a
      # non-finite loss or gradient instead of poisoning the run.
      return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

    skipped = jnp.logical_not(finite).astype(jnp.int32)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        model_state=keep_if_finite(model_state, state.model_state),
        nonfinite_count=state.nonfinite_count + skipped,
        consecutive_nonfinite=jnp.where(
            finite, 0, state.consecutive_nonfinite + 1))
    metrics = {k: jnp.asarray(v, jnp.float32) for k, v in metrics.items()}
    metrics.update(
        loss=jnp.asarray(loss, jnp.float32),
        grad_norm=grad_norm.astype(jnp.float32),
        finite=finite.astype(jnp.float32),
        nonfinite_count=new_state.nonfinite_count,
        consecutive_nonfinite=new_state.consecutive_nonfinite)
    return new_state, metrics

  return train_step


def _average_metrics(history: list[dict[str, Any]]) -> dict[str, float]:
  """Mean of each metric over the finite steps of a logging interval."""
  history = jax.device_get(history)
  finite = [m for m in history if m["finite"] > 0]
  names = [k for k in history[-1]
           if k not in ("finite", "nonfinite_count", "consecutive_nonfinite")]
  out = {}
  for name in names:
    values = [float(m[name]) for m in finite]
    out[name] = float(np.mean(values)) if values else float("nan")
  out["nonfinite_count"] = int(history[-1]["nonfinite_count"])
  return out


# ----------------------------------------------------------------------------
# Public API.
# ----------------------------------------------------------------------------


def _data_iterator(task, process_index, process_count):
  dataset = task.train_data(process_index, process_count)
  if isinstance(dataset, grain.MapDataset):
    dataset = dataset.to_iter_dataset()
  return iter(dataset)


def _evaluate(evaluate, state: TrainState, workdir: str, step: int,
              writer: metric_writers.MetricWriter) -> None:
  """Runs task.evaluate; writes its numeric scalars as eval/<name> (unless
  named; strings and None stay in its report) and, once it has finished,
  EVALUATED_FILE with the step."""
  params, model_state = state.params, state.model_state
  if jax.process_count() > 1:
    # Every process evaluates (the evals are host code over inference
    # models); a parameter sharded over several hosts cannot be fetched to
    # one, so each gets the full parameters and evaluates on its own devices
    # (a model must fit one host to be evaluated; docs/scaling.md).
    params, model_state = multihost_utils.process_allgather(
        (params, model_state), tiled=True)
    with jax.set_mesh(parallel.make_mesh(dict(data=-1, fsdp=1, tensor=1),
                                         jax.local_devices())):
      results = evaluate(params, model_state, workdir, step) or {}
  else:
    results = evaluate(params, model_state, workdir, step) or {}
  scalars = {(k if "/" in k else f"eval/{k}"): v
             for k, v in results.items()
             if np.size(v) == 1 and (
                 np.issubdtype(np.asarray(v).dtype, np.number)
                 or np.asarray(v).dtype == bool)}
  if scalars:
    writer.write_scalars(step, scalars)
  reports.write_report(os.path.join(workdir, EVALUATED_FILE),
                       {"step": int(step)})


def _check_nonfinite(metrics, step: int, limit: int) -> None:
  consecutive = int(metrics["consecutive_nonfinite"])
  if consecutive == 0:
    return
  total = int(metrics["nonfinite_count"])
  logging.warning(
      "Step %d: non-finite loss or gradients; update skipped (%d in a row, "
      "%d in total).", step, consecutive, total)
  if consecutive >= limit:
    raise RuntimeError(
        f"Stopping at step {step}: {consecutive} consecutive steps had a "
        f"non-finite loss or gradients (config.max_consecutive_nonfinite="
        f"{limit}); {total} steps were skipped in total. The last checkpoint "
        "is the last finite state. Try lowering config.optimizer.lr (or "
        "raising config.optimizer.warmup_steps), a smaller "
        "config.optimizer.grad_clip_norm, and check the data for NaN/inf.")


@dataclasses.dataclass(frozen=True)
class TrainProgram:
  """The compiled pieces of training, built without touching real data.

  Shared by train(), the benchmarks and the AOT planner: `train_step` is
  jax.jit(step, in/out shardings, donate_argnums=0) and can be lowered on
  `abstract_state` and `abstract_batch` (ShapeDtypeStructs with shardings)
  without allocating anything.
  """
  mesh: jax.sharding.Mesh
  rules: tuple[tuple[str, Any], ...]
  tx: optax.GradientTransformation
  schedule: Any
  init_fn: Any                 # (rng, batch) -> boxed TrainState
  jit_init: Any                # jitted (rng, batch) -> sharded TrainState
  abstract_state: TrainState   # ShapeDtypeStructs with shardings
  abstract_batch: Any
  state_shardings: Any
  batch_sharding: Any
  train_step: Any              # jitted (state, batch) -> (state, metrics)


def build_program(config: ml_collections.ConfigDict, task, abstract_batch,
                  *, mesh: jax.sharding.Mesh | None = None) -> TrainProgram:
  """Mesh, shardings, abstract state and the jitted init and step.

  abstract_batch: the global batch as ShapeDtypeStructs. Fails before any
  compile on a mesh or rules that do not fit the devices or the parameters.
  """
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = parallel.validate_rules(_rules(config), mesh)
  batch_sharding = parallel.batch_sharding(mesh, rules)
  replicated = parallel.replicated(mesh)
  abstract_batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sharding),
      abstract_batch)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tx, schedule = _optimizer(config, task, abstract_batch)
    init_fn = _make_init(task, tx)
    boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0), abstract_batch)
  state_shardings = parallel.logical_shardings(boxed, mesh, rules)
  abstract_state = parallel.abstract_with_shardings(parallel.unbox(boxed),
                                                    state_shardings)
  jit_init = jax.jit(
      lambda r, b: parallel.unbox(init_fn(r, b)),
      in_shardings=(replicated, batch_sharding),
      out_shardings=state_shardings)
  train_step = jax.jit(
      _make_train_step(task, tx),
      in_shardings=(state_shardings, batch_sharding),
      out_shardings=(state_shardings, replicated),
      donate_argnums=0)
  return TrainProgram(mesh, rules, tx, schedule, init_fn, jit_init,
                      abstract_state, abstract_batch, state_shardings,
                      batch_sharding, train_step)


def train(config: ml_collections.ConfigDict, workdir: str, task,
          *, mesh: jax.sharding.Mesh | None = None) -> TrainState:
  """Trains `task` to config.total_steps, resuming from workdir if possible.

  Returns the final TrainState (plain arrays sharded on the mesh). On
  SIGTERM/SIGINT it saves a checkpoint at the current step, waits for it and
  returns early (state.step < config.total_steps); rerunning resumes exactly,
  data iterator included. Raises RuntimeError after
  config.max_consecutive_nonfinite skipped (non-finite) steps in a row.
  A second run on the same workdir fails at once (workdir_lock). A run
  whose final evaluation did not finish (killed during it) evaluates on the
  next invocation.
  """
  _check_config(config)
  with workdir_lock.hold(workdir):
    try:
      return _train(config, workdir, task, mesh)
    except Exception as error:  # pylint: disable=broad-except
      path = errors.disk_full(error)
      if path is None:
        raise
      raise _disk_full_error(workdir, path) from None


def _disk_full_error(workdir: str, path: str) -> errors.DiskFullError:
  """One message for a full disk: where, and the checkpoint to resume."""
  directory = epath.Path(workdir, checkpoints.CHECKPOINT_DIR)
  # Finished saves only (an interrupted one ends in .orbax-checkpoint-tmp).
  steps = sorted(int(p.name) for p in (
      directory.iterdir() if directory.is_dir() else ()) if p.name.isdigit())
  where = path or paths.absolute(workdir)
  kept = (f"the checkpoints at steps {steps} are intact and the same command "
          f"resumes from step {steps[-1]}" if steps else
          "no checkpoint was saved yet")
  return errors.DiskFullError(
      f"No space left on device writing {where}: free space on that disk "
      f"(or use a --workdir on a larger one) and run the same command "
      f"again; {kept}.", where)


def _close_all(*closers) -> None:
  """Runs every closer; while an error is already propagating, their own
  errors (a full disk fails each one again) are logged, not raised over it."""
  propagating = sys.exc_info()[1] is not None
  first = None
  for close in closers:
    try:
      close()
    except Exception as error:  # pylint: disable=broad-except
      if propagating:
        # A full disk fails every closer again: the raised error says it.
        log = logging.info if errors.disk_full(error) is not None else (
            logging.warning)
        log("While stopping: %s", str(error).splitlines()[0][:300]
            if str(error) else type(error).__name__)
      elif first is None:
        first = error
  if first is not None:
    raise first


def _final_eval_done(workdir: str, step: int) -> bool:
  path = epath.Path(workdir, EVALUATED_FILE)
  try:
    return path.exists() and json.loads(path.read_text()).get("step") == step
  except (OSError, ValueError):
    return False


def _train(config, workdir: str, task, mesh) -> TrainState:
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  mesh = mesh or parallel.make_mesh(config.mesh)
  rules = parallel.validate_rules(_rules(config), mesh)
  process_index, process_count = jax.process_index(), jax.process_count()
  batch_sharding = parallel.batch_sharding(mesh, rules)
  total_steps = config.total_steps

  # A first batch gives the shapes; on a fresh start it is also step 1's
  # batch, on a resume the restored iterator position replaces it.
  data_iterator = _data_iterator(task, process_index, process_count)
  first_batch = device_batch(next(data_iterator))
  if not jax.tree.leaves(first_batch):
    raise ValueError(
        "task.train_data yields batches without numeric arrays; the trainer "
        "drops string entries, so tokenize text in the data pipeline.")
  global_batch_size = jax.tree.leaves(first_batch)[0].shape[0] * process_count
  abstract_batch = _global_abstract(first_batch, batch_sharding, process_count)

  program = build_program(config, task, abstract_batch, mesh=mesh)
  abstract_state, train_step = program.abstract_state, program.train_step
  schedule = program.schedule
  rng = jax.random.PRNGKey(config.seed)

  # Fingerprints of the frozen parts the run reads (its tokenizers), saved
  # with every checkpoint and checked when the model is loaded.
  dependencies = getattr(task, "dependencies", dict)()
  checkpointer = _Checkpointer(workdir, config, _batch_spec(abstract_batch),
                               dependencies)
  writer = writers.create_writer(workdir)
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=total_steps, every_steps=config.log_every_steps)
  eval_every = config.get("eval_every_steps", 0)
  evaluate = getattr(task, "evaluate", None)
  limit = config.max_consecutive_nonfinite

  try:
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      state = checkpointer.restore_intact(abstract_state, data_iterator)
      if state is not None:
        held_batch = None
      else:
        state = program.jit_init(rng, parallel.host_batch_to_global(
            first_batch, batch_sharding, process_count))
        held_batch = first_batch
        num_params = sum(math.prod(x.shape)
                         for x in jax.tree.leaves(abstract_state.params))
        logging.info("Initialized %d parameters on mesh %s.", num_params,
                     dict(mesh.shape))
        writer.write_hparams(
            json.loads(config.to_json_best_effort()))
      step = int(state.step)
      if step >= total_steps:
        logging.info("Checkpoint step %d >= config.total_steps=%d: nothing "
                     "to train.", step, total_steps)
        if evaluate and not _final_eval_done(workdir, step):
          logging.warning("The evaluation at step %d did not finish; "
                          "running it now.", step)
          _evaluate(evaluate, state, workdir, step, writer)
        return state

      with _StopRequest(checkpointer.manager) as stop_request:
        history, previous = [], None
        interval_start, interval_step = time.monotonic(), step
        while step < total_steps:
          host_batch = held_batch if held_batch is not None else device_batch(
              next(data_iterator))
          held_batch = None
          batch = parallel.host_batch_to_global(host_batch, batch_sharding,
                                                process_count)
          state, metrics = train_step(state, batch)
          step += 1
          # Check the previous step while this one runs (no pipeline stall).
          if previous is not None:
            _check_nonfinite(previous, step - 1, limit)
          previous = metrics
          history.append(metrics)
          report_progress(step)

          is_last = step == total_steps
          log_now = step % config.log_every_steps == 0 or is_last
          save_now = step % config.checkpoint_every_steps == 0 or is_last
          # Evaluate every eval_every_steps (0 = off) and always at the end.
          eval_now = bool(evaluate) and (
              (eval_every > 0 and step % eval_every == 0) or is_last)
          if log_now or save_now or eval_now:
            _check_nonfinite(metrics, step, limit)
            previous = None
          if log_now:
            now = time.monotonic()
            steps_per_sec = (step - interval_step) / max(
                now - interval_start, 1e-9)
            scalars = _average_metrics(history)
            scalars.update(steps_per_sec=steps_per_sec,
                           examples_per_sec=steps_per_sec * global_batch_size)
            if schedule is not None:  # The rate the last update used.
              scalars["learning_rate"] = float(schedule(step - 1))
            writer.write_scalars(step, scalars)
            history, interval_start, interval_step = [], now, step
          if save_now:
            checkpointer.save(step, state, data_iterator)
          if eval_now:
            with report_progress.timed("eval"):
              _evaluate(evaluate, state, workdir, step, writer)
          if not is_last and stop_request.should_stop(step,
                                                      sync_local=log_now):
            if previous is not None:
              _check_nonfinite(metrics, step, limit)
            checkpointer.save(step, state, data_iterator)
            checkpointer.manager.wait_until_finished()
            logging.warning("Stopped at step %d of %d on request; checkpoint "
                            "saved. Run again to resume.", step, total_steps)
            return state
      return state
  finally:
    _close_all(checkpointer.close, writer.flush, writer.close)


def restore(config: ml_collections.ConfigDict, workdir: str, task,
            step: int | None = None, *,
            mesh: jax.sharding.Mesh | None = None) -> Restored:
  """Loads a task's params and model state from a checkpoint onto the mesh
  (checkpoints.restore with the task's init); the optimizer is not read."""
  def init(rng, batch):
    params, model_state = task.init(rng, batch)
    return {"params": params, "model_state": model_state}
  return checkpoints.restore(workdir, init, config, step, mesh=mesh)
