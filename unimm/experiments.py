"""What `unimm.main` runs: train then evaluate, or evaluate a workdir."""
import json
import os

import numpy as np

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


def evaluate_upscaled(workdir: str, upscale: int, upsamplers=None) -> dict:
  """Does the super-resolution stage keep what the samples show?

  Samples the Parti eval prompt set once (the eval config's sampling
  settings), upsamples the same ids by `upscale`, and scores both with the
  shapes probe at the base resolution (the upscaled images box-averaged
  back down). Writes workdir/eval/upscale_x{f}.json.
  """
  from unimm import api  # pylint: disable=g-import-not-at-top
  from unimm.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  model = api.load_model(workdir, upsamplers=upsamplers)
  model.upsampler(upscale)  # A missing factor fails before sampling.
  cfg = model.task.eval_config
  seed_kw = {} if cfg["prompt_seed"] is None else {
      "seed": int(cfg["prompt_seed"])}
  captions = [c for c, _ in probe_lib.fixed_prompt_set(
      int(cfg["num_single"]), int(cfg["num_pair"]), **seed_kw)]
  cfg_scale = cfg["cfg_scale"]
  base, high = model.sample(
      captions, seed=int(cfg["seed"]),
      cfg_scale=None if cfg_scale in (None, "") else float(cfg_scale),
      temperature=float(cfg["temperature"]), top_k=int(cfg["top_k"]),
      top_p=float(cfg["top_p"]), batch_size=int(cfg["batch_size"]),
      upscale=upscale, return_base=True)
  probe = probe_lib.get_probe(base.shape[1])
  result = {"upscale": upscale, "upsampler": model.upsamplers[upscale]}
  for name, images in (("base", base), (f"x{upscale}", high)):
    accuracies = probe_lib.prompt_accuracy(captions, images, probe=probe)
    for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
      result[f"{key}_{name}"] = float(accuracies[key])
  for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
    result[f"{key}_change"] = (result[f"{key}_x{upscale}"] -
                               result[f"{key}_base"])
  out_dir = os.path.join(api.model_workdir(workdir), "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"upscale_x{upscale}.json")
  with open(path, "w") as f:
    json.dump(result, f, indent=1, sort_keys=True)
  print(json.dumps(result, indent=1, sort_keys=True))
  print("Report:", path)
  return result


def _scalars(metrics: dict) -> dict:
  return {k: (v if isinstance(v, (int, str)) else float(v))
          for k, v in metrics.items()}


def sample(workdir: str, *, prompts=None, prompts_file=None, seed=0,
           cfg_scale=None, temperature=1.0, top_k=0, top_p=1.0, upscale=1,
           upsamplers=None) -> list[str]:
  """Samples one image per prompt into workdir/samples/ as PNGs + a grid.

  upscale 2 / 4 runs the upsampler for that factor on the sampled tokens
  (`upsamplers`: their workdirs; default: the recipe's upsampler_x{f}/).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  from unimm import api  # pylint: disable=g-import-not-at-top
  from unimm.tokenizers import text  # pylint: disable=g-import-not-at-top
  from unimm.train import parti_task  # pylint: disable=g-import-not-at-top
  prompts = list(prompts or [])
  if prompts_file:
    prompts += text.read_prompts(prompts_file)
  if not prompts:
    raise ValueError("--mode sample needs --prompts or --prompts_file.")
  model = api.load_model(workdir, upsamplers=upsamplers)
  base = None
  if upscale != 1:
    model.upsampler(upscale)  # A missing factor fails before sampling.
    base, images = model.sample(
        prompts, seed=seed, cfg_scale=cfg_scale, temperature=temperature,
        top_k=top_k, top_p=top_p, upscale=upscale, return_base=True)
  else:
    images = model.sample(prompts, seed=seed, cfg_scale=cfg_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p)
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(out_dir, f"{i:05d}.png"))
    Image.fromarray(image).save(paths[-1])
  if base is None:
    parti_task.save_sample_grid(images, prompts,
                                os.path.join(out_dir, "grid.png"))
  else:
    # Side by side: the base sample (pixels enlarged) and its upscaling.
    size = images.shape[1]
    enlarged = np.repeat(np.repeat(base, size // base.shape[1], 1),
                         size // base.shape[2], 2)
    pairs = np.concatenate([enlarged, images], axis=2)
    parti_task.save_sample_grid(pairs, prompts,
                                os.path.join(out_dir, "grid.png"),
                                columns=4, cell=size)
  with open(os.path.join(out_dir, "prompts.txt"), "w") as f:
    f.write("\n".join(prompts) + "\n")
  print(f"Wrote {len(paths)} samples and grid.png to {out_dir}")
  return paths
