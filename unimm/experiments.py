"""What `unimm.main` runs: train then evaluate, or evaluate a workdir."""
import json
import os

from absl import logging
import jax
import ml_collections

from unimm.train import tasks
from unimm.train import trainer


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str):
  """Trains config.task in workdir (resuming if it has checkpoints).

  The trainer evaluates at the end of training; a run stopped by SIGTERM
  returns early after saving, and the same command resumes it.
  """
  task = tasks.get_task(config)
  state = trainer.train(config, workdir, task)
  if int(state.step) < config.total_steps:
    logging.info("Stopped at step %d of %d; checkpoint saved. Run the same "
                 "command to resume.", int(state.step), config.total_steps)
  return state


def evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Restores the latest checkpoint of workdir and runs the task's eval."""
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task)
  metrics = task.evaluate(restored.params, restored.model_state, workdir,
                          int(restored.step))
  if jax.process_index() == 0:
    logging.info("Evaluation at step %d: %s", int(restored.step),
                 json.dumps(_scalars(metrics), sort_keys=True))
    print(json.dumps(_scalars(metrics), indent=1, sort_keys=True))
    print("Report:", os.path.join(workdir, "eval", "report.json"))
  return metrics


def _scalars(metrics: dict) -> dict:
  return {k: (v if isinstance(v, (int, str)) else float(v))
          for k, v in metrics.items()}
