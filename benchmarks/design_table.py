r"""Prints the design table of interleaved runs side by side (docs/designs.md):
one row per workdir, from its config, metrics.jsonl and eval/report.json.

  python benchmarks/design_table.py --workdirs W1,W2,...

Columns: image input, tokens a 32x32 image takes when read (its span, BOI
and EOI included), training steps/s (median of the logged intervals),
held-out text and image loss, caption / question / text-to-image (one
object) / edit / referring / grounded caption / draw-in-box accuracy. A
run without an eval report, or without that eval, prints "-".
"""
import argparse
import json
import os
import statistics

from unimm import checkpoints
from unimm.models import image_input as image_input_lib

COLUMNS = (("caption", "caption_accuracy"),
           ("question", "question_accuracy"),
           ("t2i single", "prompt_accuracy_single"),
           ("edit", "edit_accuracy"),
           ("referring", "referring_accuracy"),
           ("grounded caption", "grounded_caption_accuracy"),
           ("draw in box", "draw_box_accuracy"),
           ("text loss", "eval_text_loss"),
           ("image loss", "eval_image_loss"))


def read_tokens(model_config) -> int:
  """Tokens of a read 32x32 image's span (codes: the tokenizer grid)."""
  kind = model_config.get("image_input", "codes")
  if kind == "codes":
    return int(model_config.image_length) + 2
  setting = image_input_lib.ImageInput(kind, int(model_config.patch_size),
                                       int(model_config.num_queries))
  return setting.span_length((32, 32, 3))


def row(workdir: str) -> dict:
  config = checkpoints.saved_config(checkpoints.find(workdir))
  rates = []
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    for line in f:
      rate = json.loads(line).get("steps_per_sec")
      if rate:
        rates.append(rate)
  report = {}
  path = os.path.join(workdir, "eval", "report.json")
  if os.path.exists(path):
    with open(path) as f:
      report = json.load(f)
  kind = config.model.get("image_input", "codes")
  if kind == "resampler":
    kind += f" {config.model.num_queries}"
  if config.model.get("image_output", "codes") != "codes":
    kind += (f", writes {config.model.image_output} "
             f"({config.model.get('image_head', 'l2')})")
  if (config.get("loss") or {}).get("diffusion_weight"):
    kind += f", diffusion loss x{config.loss.diffusion_weight:g}"
  return dict(name=kind, tokens=read_tokens(config.model),
              steps=report.get("steps", "-"),
              rate=statistics.median(rates) if rates else float("nan"),
              **{k: report.get(key) for k, key in COLUMNS})


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdirs", required=True,
                      help="comma-separated workdirs, one row each")
  args = parser.parse_args()
  rows = [row(w) for w in args.workdirs.split(",") if w]
  header = ["design", "tokens / image", "steps", "steps/s"] + [
      k for k, _ in COLUMNS]
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  for r in rows:
    cells = [r["name"], str(r["tokens"]), str(r["steps"]), f"{r['rate']:.2f}"]
    cells += ["-" if r[k] is None else f"{r[k]:.3f}" for k, _ in COLUMNS]
    print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
  main()
