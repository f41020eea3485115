r"""unimm entry point: flags only.

Example:
  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo
  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo \
      --mode sample --prompts "a big red circle" --output_dir my_samples
  python -m unimm.main --config configs/interleaved_shapes.py \
      --workdir workdirs/interleaved --mode caption --images a.png b.png

Modes: train (then evaluate; resumes), eval (a trained workdir), sample
(prompts -> PNGs + grid.png), caption (image files -> captions, with an
interleaved model). Sampling settings not given are the model's eval
settings. --config configs/x.py:size=tiny picks a variant;
--config.total_steps=100 overrides one field.
"""
import logging as std_logging
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from unimm import config_lib
from unimm import end_to_end
from unimm import errors
from unimm import experiments
from unimm import host_memory
from unimm import parallel
from unimm.inference import EVAL

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:arg]).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None,
                               "Directory for checkpoints, metrics, reports.")
_MODE = flags.DEFINE_enum(
    "mode", "train", ["train", "eval", "sample", "caption"],
    "train (then evaluate), eval a trained workdir, sample images, or "
    "caption images (interleaved models).")
_PROMPTS = flags.DEFINE_multi_string(
    "prompts", None, "--mode sample: a prompt (repeat the flag for more).")
_PROMPTS_FILE = flags.DEFINE_string(
    "prompts_file", None, "--mode sample: one prompt a line, or a TSV with a "
    "Prompt column (e.g. PartiPrompts.tsv).")
_IMAGES = flags.DEFINE_multi_string(
    "images", None, "--mode caption: image files (repeat the flag, or list "
    "them after one --images).")
_OUTPUT_DIR = flags.DEFINE_string(
    "output_dir", None, "--mode sample / caption: where to write (default: "
    "a new WORKDIR/samples/<time>/ or WORKDIR/captions/<time>/).")
_SEED = flags.DEFINE_integer("seed", 0, "--mode sample / caption: seed.")
_CFG_SCALE = flags.DEFINE_string(
    "cfg_scale", None, "--mode sample: classifier-free guidance scale, or "
    "'none' for no guidance (default: the eval's setting).")
_TEMPERATURE = flags.DEFINE_float("temperature", None, "--mode sample "
                                  "(default: the eval's setting).")
_TOP_K = flags.DEFINE_integer("top_k", None, "--mode sample (0 = off; "
                              "default: the eval's setting).")
_TOP_P = flags.DEFINE_float("top_p", None, "--mode sample (1 = off; "
                            "default: the eval's setting).")
_CONTRASTIVE_ALPHA = flags.DEFINE_float(
    "contrastive_alpha", None, "--mode sample: CM3Leon's contrastive "
    "decoding (CD-K) with this plausibility factor in (0, 1], instead of "
    "guidance (default: the eval's setting).")
_CONTRASTIVE_K = flags.DEFINE_integer(
    "contrastive_k", None, "--mode sample: CD-K's head is taken at the k-th "
    "likeliest token (default: the eval's setting).")
_SJD_WINDOW = flags.DEFINE_integer(
    "sjd_window", None, "--mode sample: speculative Jacobi decoding of image "
    "spans with windows of this many tokens (0 = off; the same "
    "distribution in fewer model steps; default: the eval's setting).")
_NUM_BEAMS = flags.DEFINE_integer("num_beams", None, "--mode caption: beam "
                                  "width (default: the eval's setting).")
_RERANK_WEIGHT = flags.DEFINE_float(
    "rerank_weight", None, "--mode caption: weight of log p(image | "
    "caption) in reranking the beams (default: the eval's setting).")
_UPSCALE = flags.DEFINE_integer(
    "upscale", 1, "--mode sample: 1 (the tokenizer's resolution), or 2 / 4 "
    "through a trained upsampler (Parti's super-resolution stage). --mode "
    "eval --upscale F: probe accuracy of base vs upscaled samples.")
_UPSAMPLER_WORKDIR = flags.DEFINE_multi_string(
    "upsampler_workdir", None, "--mode sample --upscale F: the workdir of an "
    "upsampler trained for F (configs/upsampler_shapes.py); by default an "
    "end-to-end recipe's upsampler_x{F}/ stage.")
flags.mark_flags_as_required(["config", "workdir"])


def _given(value):
  """A flag left unset means the eval's setting."""
  return EVAL if value is None else value


def _cfg_scale(value: str | None):
  if value is None:
    return EVAL
  if value.lower() in ("none", ""):
    return None
  try:
    return float(value)
  except ValueError:
    raise app.UsageError(f"--cfg_scale={value!r}; expected a number >= 0 "
                         "or 'none'.") from None


def _config_spec(argv) -> str | None:
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg[len("--config="):]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _parse_flags(argv):
  """absl's parsing, with one clear line for a --config.FIELD override that
  names no field (ml_collections raises a bare AttributeError there)."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError):
    spec = _config_spec(argv)
    config = config_lib.load_config(spec) if spec else None
    for arg in argv[1:]:
      name = arg.split("=", 1)[0]
      if not name.startswith("--config.") or config is None:
        continue
      problem = config_lib.unknown_field(config, name[len("--config."):])
      if problem:
        sys.stderr.write(
            f"FATAL Flags parsing error: {arg}: {problem} Fix or remove the "
            f"override (the fields are set in {spec}).\n")
        sys.exit(1)
    raise


def _is_disk_full(record: std_logging.LogRecord) -> bool:
  error = record.exc_info[1] if record.exc_info else None
  return record.levelno >= std_logging.ERROR and (
      errors.disk_full(Exception(record.getMessage())) is not None or (
          error is not None and errors.disk_full(error) is not None))


class _QuietLibraries(std_logging.Filter):
  """Keeps library INFO chatter (orbax saves, tfds, grain) off the console so
  progress, metrics and ETA stay readable; their warnings still show."""
  NOISY = ("/orbax/", "/tensorflow_datasets/", "/grain/", "/etils/")

  def filter(self, record):
    if _is_disk_full(record):
      return False  # orbax's and clu's threads each log it; main says it once
    return record.levelno >= std_logging.WARNING or not any(
        part in record.pathname for part in self.NOISY)


def main(argv):
  if len(argv) > 1 and _MODE.value != "caption":
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logging.set_verbosity(logging.INFO)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  sys.excepthook = _excepthook(sys.excepthook)
  try:
    _run(argv)
  except Exception as error:  # pylint: disable=broad-except
    path = errors.disk_full(error)
    if path is None:
      raise
    message = str(error) if isinstance(error, errors.DiskFullError) else (
        f"No space left on device writing {path or _WORKDIR.value}: free "
        "space on that disk and run the same command again.")
    logging.flush()
    sys.stdout.flush()
    sys.stderr.write(f"FATAL {message}\n")
    sys.stderr.flush()
    # Not sys.exit: the checkpointer's threads would each report the same
    # failure again while the interpreter shuts down.
    os._exit(1)  # pylint: disable=protected-access


def _excepthook(previous):
  """sys.excepthook without the RuntimeError("Event loop is closed") that
  TensorStore callbacks report after a failed checkpoint write has closed
  orbax's loop (the failure itself is reported once, by main)."""
  def hook(exc_type, exc, tb):
    if not (exc_type is RuntimeError and "Event loop is closed" in str(exc)):
      previous(exc_type, exc, tb)
  return hook


def _run(argv):
  parallel.initialize_distributed()
  config, workdir = _CONFIG.value, _WORKDIR.value
  if end_to_end.is_end_to_end(config):
    if _MODE.value == "train":
      end_to_end.run(config, workdir)
      return
    # eval / sample / caption act on the recipe's model stage.
    config, workdir = end_to_end.model_stage(config, workdir)
  if _MODE.value == "train":
    experiments.train_and_evaluate(config, workdir)
  elif _MODE.value == "eval" and _UPSCALE.value != 1:
    experiments.evaluate_upscaled(workdir, _UPSCALE.value,
                                  _UPSAMPLER_WORKDIR.value)
  elif _MODE.value == "eval":
    experiments.evaluate(config, workdir)
  elif _MODE.value == "caption":
    experiments.caption(workdir, images=list(_IMAGES.value or []) + argv[1:],
                        seed=_SEED.value, num_beams=_given(_NUM_BEAMS.value),
                        rerank_weight=_given(_RERANK_WEIGHT.value),
                        output_dir=_OUTPUT_DIR.value)
  else:
    experiments.sample(workdir, prompts=_PROMPTS.value,
                       prompts_file=_PROMPTS_FILE.value, seed=_SEED.value,
                       cfg_scale=_cfg_scale(_CFG_SCALE.value),
                       temperature=_given(_TEMPERATURE.value),
                       top_k=_given(_TOP_K.value),
                       top_p=_given(_TOP_P.value),
                       contrastive_alpha=_given(_CONTRASTIVE_ALPHA.value),
                       contrastive_k=_given(_CONTRASTIVE_K.value),
                       sjd_window=_given(_SJD_WINDOW.value),
                       upscale=_UPSCALE.value,
                       upsamplers=_UPSAMPLER_WORKDIR.value,
                       output_dir=_OUTPUT_DIR.value)


if __name__ == "__main__":
  host_memory.keep_freed_memory()  # before JAX starts its CPU backend
  app.run(main, flags_parser=_parse_flags)
