r"""Text-to-image sampling time of models side by side in one run: Parti
or interleaved models on different image tokens (a grid of codes, SEED's
1-D tokens), or interleaved models that write images differently (codes,
Emu's regressed embeddings, output queries).

  python benchmarks/sampling_speed.py \
      --workdirs workdirs/designs/codes,workdirs/designs/embeddings,workdirs/designs/queries
  python benchmarks/sampling_speed.py --workdirs workdirs/demo/parti,workdirs/demo_seed16/parti

For each model: `model.sample()` of --prompts shapes captions in batches of
--batch with the model's eval settings (guidance included), after one
warm-up batch that compiles; prints ms per image (best of --repeats), the
part spent in the de-tokenizer (its decode_conditions alone, on the same
conditions, for models that have one) and the ratio to the first row.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

import common
import unimm
from unimm.data import shapes

_WORKDIRS = flags.DEFINE_list("workdirs", None, "Parti or interleaved runs "
                              "or exports, one row each.", required=True)
_PROMPTS = flags.DEFINE_integer("prompts", 100, "Prompts per timing.")
_BATCH = flags.DEFINE_integer("batch", 50, "Prompts per sample() call.")
_REPEATS = flags.DEFINE_integer("repeats", 2, "Timed passes (best kept).")


def main(_):
  rng = np.random.default_rng(0)
  prompts = [shapes.caption(shapes.scene_from_rng(rng), 0)
             for _ in range(_PROMPTS.value)]
  batches = [prompts[i:i + _BATCH.value]
             for i in range(0, len(prompts), _BATCH.value)]
  print("| model | image tokens | writes | ms / image | of which "
        "de-tokenizer | ratio |")
  print("|---|---|---|---|---|---|")
  first = None
  for workdir in _WORKDIRS.value:
    model = unimm.load_model(workdir)
    seconds = common.timed(lambda m=model: [m.sample(b) for b in batches],
                           repeats=_REPEATS.value)
    ms = 1e3 * seconds / len(prompts)
    detok_ms = "-"
    tokenizer = getattr(model, "tokenizer", None) or model.image_tokenizer
    h, w = tokenizer.grid
    writes = getattr(model.model, "image_output", "codes")
    if getattr(model, "detokenizer", None) is not None:
      conditions = np.zeros(
          (len(batches[0]), h * w, model.model.embedding_dim), np.float32)
      detok = common.timed(lambda m=model, c=conditions: [
          m.detokenizer.decode_conditions(c) for _ in batches],
                           repeats=_REPEATS.value)
      detok_ms = f"{1e3 * detok / len(prompts):.1f}"
    first = first or ms
    print(f"| {workdir} | {h}x{w} | {writes} | {ms:.1f} | {detok_ms} | "
          f"{ms / first:.2f} |")


if __name__ == "__main__":
  app.run(main)
