r"""Exports a trained model as a self-contained folder that loads anywhere.

Example:
  python -m unimm.export --workdir workdirs/demo --out exports/shapes-parti
  python -m unimm.export --workdir workdirs/interleaved --out exports/il

writes

  OUT/checkpoints/<step>/   params only (no optimizer, no data state), the
                            run's config with its paths made relative to
                            OUT, and the batch shapes its init needs
  OUT/tokenizer/            the image tokenizer, exported the same way
  OUT/text_tokenizer.model  the SentencePiece model (text-to-image and
                            interleaved models)
  OUT/upsampler_x{2,4}/     Parti's upsamplers, when the run has them
  OUT/detokenizer/          the diffusion de-tokenizer of an interleaved
                            model that regresses image embeddings
  OUT/model_card.json       what it is, what it was trained on, its step,
                            parameter count and eval report

`unimm.load_model(OUT)` (or load_tokenizer / load_upsampler for those
runs) loads it from any working directory or machine: nothing in it points
outside OUT. `--workdir` is a training workdir, an end-to-end recipe's
workdir (its parti/ stage and upsamplers, or its interleaved/ stage) or
another export.
"""
import datetime
import json
import os
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

import unimm
from unimm import checkpoints
from unimm import inference
from unimm import paths
from unimm.evaluation import reports

TOKENIZER_DIR = "tokenizer"
DETOKENIZER_DIR = "detokenizer"
TEXT_TOKENIZER_FILE = "text_tokenizer.model"
MODEL_CARD = "model_card.json"


def write_params_checkpoint(out: str, step: int, params: Any,
                      config: ml_collections.ConfigDict,
                      meta: dict[str, Any]) -> None:
  """OUT/checkpoints/<step>/ with state {params, step}, config and meta."""
  manager = checkpoints.checkpoint_manager(out)
  try:
    state = {"params": jax.device_get(params),
             "step": np.asarray(step, np.int32)}
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeSave(state),
        config=ocp.args.JsonSave(json.loads(config.to_json_best_effort())),
        meta=ocp.args.JsonSave({
            "batch_spec": meta["batch_spec"],
            # Its copies of the tokenizers are the ones it was trained with.
            "dependencies": meta.get("dependencies", {}),
            "params_checksum": checkpoints.params_checksum(state["params"])})))
    manager.wait_until_finished()
  finally:
    manager.close()


def _parameter_count(params) -> int:
  return int(sum(np.size(x) for x in jax.tree.leaves(params)))


def _eval_report(workdir: str) -> dict[str, Any]:
  path = epath.Path(workdir, "eval", "report.json")
  if not path.is_file():
    return {}
  return json.loads(path.read_text())


def _check_out(out: str, source: str) -> None:
  if paths.absolute(out) == paths.absolute(source):
    raise ValueError(f"--out {out!r} is the run being exported; pick a new "
                     "folder.")
  folder = epath.Path(out)
  if folder.exists() and any(folder.iterdir()):
    raise ValueError(f"--out {out!r} exists and is not empty; export into a "
                     "new folder (nothing was written).")


def export_tokenizer(path: str, out: str, step: int | None = None) -> str:
  """Writes the ViT-VQGAN of `path` to `out` (params of its generator)."""
  _check_out(out, path)
  tokenizer = inference.load_tokenizer(path, step)
  _, config, meta = checkpoints.saved(path, tokenizer.step)
  write_params_checkpoint(out, tokenizer.step, {"generator": tokenizer.params},
                    config, meta)
  return out


def _export_upsampler(path: str, out: str) -> str:
  """An upsampler beside an exported model: its tokenizer is ../tokenizer."""
  _check_out(out, path)
  upsampler = inference.load_upsampler(path)
  _, config, meta = checkpoints.saved(path, upsampler.step)
  config.tokenizer_workdir = os.path.join("..", TOKENIZER_DIR)
  write_params_checkpoint(out, upsampler.step, upsampler.params, config, meta)
  return out


def _export_detokenizer(path: str, out: str) -> str:
  """A de-tokenizer beside an exported model: its tokenizer is
  ../tokenizer."""
  _check_out(out, path)
  detokenizer = inference.load_detokenizer(path)
  _, config, meta = checkpoints.saved(path, detokenizer.step)
  config.tokenizer_workdir = os.path.join("..", TOKENIZER_DIR)
  write_params_checkpoint(out, detokenizer.step, detokenizer.params, config,
                          meta)
  return out


def export(workdir: str, out: str, step: int | None = None) -> dict[str, Any]:
  """Exports the run in `workdir` to `out`; returns its model card."""
  path = inference.model_path(workdir)
  _check_out(out, path)
  step, config, meta = checkpoints.saved(path, step)
  task = config.get("task")
  card = {
      "name": os.path.basename(paths.normalized(out)),
      "task": task,
      "step": int(step),
      "exported_from": paths.absolute(path),
      "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
          timespec="seconds"),
      "unimm_version": unimm.__version__,
      "trained_on": config.get("data", ml_collections.ConfigDict()).to_dict(),
      "model": config.model.to_dict(),
      "eval_report": _eval_report(path),
  }
  epath.Path(out).mkdir(parents=True, exist_ok=True)
  if task == "vit_vqgan":
    tokenizer = inference.load_tokenizer(path, step)
    export_tokenizer(path, out, step)
    card["parameters"] = _parameter_count(tokenizer.params)
    card["load_with"] = "unimm.load_tokenizer"
  elif task == "upsampler":
    upsampler = inference.load_upsampler(path, step)
    export_tokenizer(upsampler.tokenizer.path,
                     os.path.join(out, TOKENIZER_DIR))
    config.tokenizer_workdir = TOKENIZER_DIR
    write_params_checkpoint(out, upsampler.step, upsampler.params, config, meta)
    card["parameters"] = _parameter_count(upsampler.params)
    card["load_with"] = "unimm.load_upsampler"
  elif task in ("parti", "interleaved"):
    model = inference.load_model(path, step)
    tokenizer = (model.image_tokenizer if task == "parti"
                 else model.tokenizer)
    export_tokenizer(tokenizer.path, os.path.join(out, TOKENIZER_DIR))
    epath.Path(out, TEXT_TOKENIZER_FILE).write_bytes(
        model.text_tokenizer.model_proto)
    config.tokenizer_workdir = TOKENIZER_DIR
    config.text_tokenizer = TEXT_TOKENIZER_FILE
    if getattr(model, "detokenizer", None) is not None:
      _export_detokenizer(model.detokenizer.path,
                          os.path.join(out, DETOKENIZER_DIR))
      config.detokenizer_workdir = DETOKENIZER_DIR
    write_params_checkpoint(out, model.step, model.params, config, meta)
    card["parameters"] = _parameter_count(model.params)
    card["load_with"] = "unimm.load_model"
    card["sampling_defaults"] = dict(model.settings)
    if task == "parti":
      card["upsamplers"] = {}
      for factor, source in sorted(model.upsamplers.items()):
        source = source if isinstance(source, str) else source.path
        name = f"upsampler_x{factor}"
        _export_upsampler(source, os.path.join(out, name))
        card["upsamplers"][str(factor)] = name
  else:
    epath.Path(out).rmtree(missing_ok=True)
    raise ValueError(f"{path!r} holds a {task!r} run; export takes a "
                     "tokenizer, upsampler, text-to-image or interleaved run.")
  reports.write_json(os.path.join(out, MODEL_CARD), card)
  logging.info("Exported %s (step %d) to %s.", path, step, out)
  return card


_WORKDIR = flags.DEFINE_string(
    "workdir", None, "The trained run (a training workdir, an end-to-end "
    "recipe's workdir, or an export).")
_OUT = flags.DEFINE_string("out", None, "The new folder to write.")
_STEP = flags.DEFINE_integer("step", None, "The checkpoint step (default: "
                             "the latest).")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  card = export(_WORKDIR.value, _OUT.value, _STEP.value)
  print(json.dumps({k: card[k] for k in ("name", "task", "step",
                                          "parameters", "load_with")},
                   indent=1))
  print(f"Load it with {card['load_with']}({_OUT.value!r}).")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main)
