"""What `unimm.main` runs: train then evaluate, or evaluate a workdir."""
import datetime
import json
import os

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from unimm import api
from unimm import config_lib
from unimm.data import convert
from unimm.evaluation import grids
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import reports
from unimm.inference import EVAL
from unimm.tokenizers import text as text_lib
from unimm.train import parti_task
from unimm.train import tasks
from unimm.train import trainer
from unimm.train import workdir_lock


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
  with workdir_lock.hold(workdir):
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
  model = api.load_model(workdir, upsamplers=upsamplers)
  model.upsampler(upscale)  # A missing factor fails before sampling.
  cfg = config_lib.with_defaults(parti_task.EVAL_DEFAULTS, model.config,
                                 "eval")
  seed_kw = {} if cfg["prompt_seed"] is None else {
      "seed": int(cfg["prompt_seed"])}
  captions = [c for c, _ in probe_lib.fixed_prompt_set(
      int(cfg["num_single"]), int(cfg["num_pair"]), **seed_kw)]
  base, high = model.sample(captions, seed=int(cfg["seed"]), upscale=upscale,
                            return_base=True)  # the eval's settings
  probe = probe_lib.get_probe(base.shape[1])
  result = {"upscale": upscale, "upsampler": model.upsampler(upscale).path}
  for name, images in (("base", base), (f"x{upscale}", high)):
    accuracies = probe_lib.prompt_accuracy(captions, images, probe=probe)
    for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
      result[f"{key}_{name}"] = float(accuracies[key])
  for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
    result[f"{key}_change"] = (result[f"{key}_x{upscale}"] -
                               result[f"{key}_base"])
  path = os.path.join(api.model_path(workdir), "eval",
                      f"upscale_x{upscale}.json")
  result = reports.write_report(path, result)
  print(json.dumps(result, indent=1, sort_keys=True))
  print("Report:", path)
  return result


def _scalars(metrics: dict) -> dict:
  return {k: (v if isinstance(v, (int, str)) else float(v))
          for k, v in metrics.items()}


def _output_dir(path: str, output_dir: str | None, what: str) -> str:
  """output_dir, else a new PATH/WHAT/<time>/ (never a recipe's own files)."""
  if output_dir:
    epath.Path(output_dir).mkdir(parents=True, exist_ok=True)
    return output_dir
  stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
  for n in range(1000):
    output_dir = os.path.join(path, what, stamp + (f"-{n}" if n else ""))
    try:
      epath.Path(output_dir).mkdir(parents=True)
      return output_dir
    except FileExistsError:
      continue
  raise ValueError(f"No new folder under {os.path.join(path, what)!r}; "
                   "pass --output_dir.")


def sample(workdir: str, *, prompts=None, prompts_file=None, seed=0,
           cfg_scale=EVAL, temperature=EVAL, top_k=EVAL, top_p=EVAL,
           contrastive_alpha=EVAL, contrastive_k=EVAL, sjd_window=EVAL,
           upscale=1,
           upsamplers=None, output_dir=None) -> list[str]:
  """Samples one image per prompt: PNGs, grid.png and prompts.txt in
  output_dir (default: a new WORKDIR/samples/<time>/). Settings left at
  EVAL are the model's eval settings. upscale 2 / 4 runs the upsampler
  for that factor on a Parti model's tokens (`upsamplers`: their folders;
  default: the recipe's upsampler_x{f}/)."""
  prompts = list(prompts or [])
  if prompts_file:
    prompts += text_lib.read_prompts(prompts_file)
  if not prompts:
    raise ValueError("--mode sample needs --prompts or --prompts_file.")
  model = api.load_model(workdir, upsamplers=upsamplers)
  given = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k,
               top_p=top_p, contrastive_alpha=contrastive_alpha,
               contrastive_k=contrastive_k, sjd_window=sjd_window)
  settings = {k: v for k, v in given.items() if v is not EVAL}
  base = None
  if isinstance(model, api.InterleavedModel) and upscale != 1:
    raise ValueError(f"--upscale {upscale}: the interleaved model has no "
                     "upsampler; use --upscale 1.")
  if upscale != 1:
    model.upsampler(upscale)  # A missing factor fails before sampling.
    base, images = model.sample(prompts, seed=seed, upscale=upscale,
                                return_base=True, **settings)
  else:
    images = model.sample(prompts, seed=seed, **settings)
  out_dir = _output_dir(api.model_path(workdir), output_dir, "samples")
  paths = []
  for i, image in enumerate(images):
    paths.append(os.path.join(out_dir, f"{i:05d}.png"))
    grids.save_image(Image.fromarray(image), paths[-1])
  if base is None:
    grids.save_image_grid(images, prompts, os.path.join(out_dir, "grid.png"))
  else:
    # Side by side: the base sample (pixels enlarged) and its upscaling.
    size = images.shape[1]
    enlarged = np.repeat(np.repeat(base, size // base.shape[1], 1),
                         size // base.shape[2], 2)
    grids.save_image_grid(grids.side_by_side(enlarged, images), prompts,
                          os.path.join(out_dir, "grid.png"), columns=4,
                          cell=size)
  epath.Path(out_dir, "prompts.txt").write_text("\n".join(prompts) + "\n")
  print(f"Wrote {len(paths)} samples and grid.png to {out_dir}")
  return paths


def read_images(paths, size: int) -> np.ndarray:
  """Image files -> uint8 [N, size, size, 3] (RGB, resized and centre
  cropped as the data converter does)."""
  images = []
  for path in paths:
    with epath.Path(path).open("rb") as f, Image.open(f) as image:
      images.append(np.asarray(convert.resize_and_center_crop(
          convert.to_rgb(image), size)))
  return np.stack(images)


def caption(workdir: str, *, images, seed=0, num_beams=EVAL,
            rerank_weight=EVAL, output_dir=None) -> list[str]:
  """Captions image files with an interleaved model (its eval's caption
  settings unless given): prints "path<TAB>caption" lines and writes
  captions.jsonl and grid.png to output_dir (default: a new
  WORKDIR/captions/<time>/)."""
  if not images:
    raise ValueError("--mode caption needs --images (image files).")
  model = api.load_model(workdir)
  if not isinstance(model, api.InterleavedModel):
    raise ValueError(f"--mode caption needs an interleaved model; "
                     f"{workdir!r} holds a {model.config.get('task')!r} run "
                     "(configs/interleaved_shapes.py trains one).")
  pixels = read_images(images, model.tokenizer.image_size)
  captions = model.caption(pixels, seed=seed, num_beams=num_beams,
                           rerank_weight=rerank_weight)
  out_dir = _output_dir(api.model_path(workdir), output_dir, "captions")
  lines = []
  for path, text in zip(images, captions):
    lines.append(json.dumps({"image": path, "caption": text}) + "\n")
    print(f"{path}\t{text}")
  epath.Path(out_dir, "captions.jsonl").write_text("".join(lines))
  grids.save_image_grid(pixels, captions, os.path.join(out_dir, "grid.png"))
  return captions
