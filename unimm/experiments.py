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


def sample(workdir: str, *, prompts=None, prompts_file=None, seed=0,
           cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0) -> list[str]:
  """Samples one image per prompt into workdir/samples/ as PNGs + a grid."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from unimm import api  # pylint: disable=g-import-not-at-top
  from unimm.tokenizers import text  # pylint: disable=g-import-not-at-top
  from unimm.train import parti_task  # pylint: disable=g-import-not-at-top
  prompts = list(prompts or [])
  if prompts_file:
    prompts += text.read_prompts(prompts_file)
  if not prompts:
    raise ValueError("--mode sample needs --prompts or --prompts_file.")
  model = api.load_model(workdir)
  images = model.sample(prompts, seed=seed, cfg_scale=cfg_scale,
                        temperature=temperature, top_k=top_k, top_p=top_p)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(out_dir, f"{i:05d}.png"))
    Image.fromarray(image).save(paths[-1])
  parti_task.save_sample_grid(images, prompts, os.path.join(out_dir,
                                                            "grid.png"))
  with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")
  print(f"Wrote {len(paths)} samples and grid.png to {out_dir}")
  return paths
