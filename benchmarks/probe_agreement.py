r"""How far does the shapes probe's verdict on decoded images hang on its seed?

  python benchmarks/probe_agreement.py --tokenizer_workdir workdirs/tokenizer \
      [--seeds 0,1] [--steps 3000] [--blur_max 1.0]

Trains one probe per seed (probe.train_probe with the given recipe; the
cached probe is not touched), then reads the tokenizer's reconstructions of
the fixed prompt set's true renders (the eval's "ceiling") and the renders
themselves. Prints each probe's single / pair / shape accuracy on both and,
for every two seeds, the fraction of prompts whose verdict (right or wrong)
they share. A probe whose verdict on reconstructions changes with its seed
measures itself as much as the tokenizer (README, "The probe's share").
"""
import itertools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from unimm import host_memory

_TOKENIZER = flags.DEFINE_string("tokenizer_workdir", None,
                                 "A ViT-VQGAN workdir.", required=True)
_SEEDS = flags.DEFINE_list("seeds", ["0", "1"], "Probe seeds (>= 2).")
_STEPS = flags.DEFINE_integer("steps", 3000, "Probe training steps.")
_BLUR = flags.DEFINE_float("blur_max", 1.0, "Probe blur augmentation (px).")
_PROMPTS = flags.DEFINE_integer("num_prompts", 200,
                                "Single and pair prompts each.")


def main(_):
  import unimm  # pylint: disable=g-import-not-at-top
  from unimm.data import shapes  # pylint: disable=g-import-not-at-top
  from unimm.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in _SEEDS.value]
  if len(seeds) < 2:
    raise app.UsageError(f"--seeds={_SEEDS.value}: give at least two seeds "
                         "to compare.")
  tokenizer = unimm.load_tokenizer(_TOKENIZER.value)
  n = _PROMPTS.value
  pairs = probe_lib.fixed_prompt_set(n, n)
  prompts = [p for p, _ in pairs]
  real = np.stack([shapes.render(s, tokenizer.image_size) for _, s in pairs])
  recon = np.concatenate([np.asarray(tokenizer.decode(tokenizer.encode(
      real[i:i + 100]))) for i in range(0, len(real), 100)])
  verdicts = {}
  for seed in seeds:
    probe = probe_lib.train_probe(seed=seed, steps=_STEPS.value,
                                  blur_max=_BLUR.value,
                                  image_size=tokenizer.image_size)
    for name, images in (("renders", real), ("reconstructions", recon)):
      r = probe_lib.prompt_accuracy(prompts, images, probe)
      print(f"seed {seed} {name}: single {r['prompt_accuracy_single']:.3f} "
            f"pair {r['prompt_accuracy_pair']:.3f} "
            f"shape {r['shape_accuracy']:.3f}", flush=True)
    verdicts[seed] = np.array(
        [probe_lib.score_prompt(shapes.parse_caption(p), q)["correct"]
         for p, q in zip(prompts, probe.predict(recon))])
  for a, b in itertools.combinations(seeds, 2):
    same = verdicts[a] == verdicts[b]
    print(f"seeds {a} and {b} agree on reconstructions: single "
          f"{same[:n].mean():.3f}, pair {same[n:].mean():.3f}")


if __name__ == "__main__":
  host_memory.keep_freed_memory()
  app.run(main)
