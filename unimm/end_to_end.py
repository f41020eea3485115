"""The whole text-to-image recipe as one resumable job (configs/shapes_demo.py).

  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo

runs, each stage in a subdirectory of the workdir:
  1. tokenizer/  train the ViT-VQGAN on pixels (config.tokenizer);
  2. text/       train a SentencePiece model on the data set's captions
                 (config.text);
  3. data/       pre-tokenize image-caption pairs once with both frozen
                 tokenizers (config.pretokenize);
  4. parti/      train Parti on the shards and evaluate it with the shapes
                 probe: parti/eval/report.json, parti/eval/samples.png
                 (config.parti);
  5. parti/samples/  sample config.prompts: one PNG each and grid.png.
A stage whose output is complete is skipped, so rerunning the command after
a stop (Ctrl-C, SIGTERM, preemption) resumes where it was. The stage configs
are ordinary experiment configs; the paths between stages are filled in here.
"""
import dataclasses
import json
import os
import time

from absl import logging
import jax
import ml_collections

from unimm import api
from unimm import experiments
from unimm.data import pretokenize
from unimm.data import shapes
from unimm.tokenizers import text as text_lib
from unimm.train import trainer
from unimm.train import workdir_lock

STAGES = ("tokenizer", "text", "data", "parti", "samples")


@dataclasses.dataclass(frozen=True)
class Paths:
  """Where each stage of a workdir writes."""
  workdir: str

  @property
  def tokenizer(self) -> str:
    return os.path.join(self.workdir, "tokenizer")

  @property
  def text_prefix(self) -> str:
    return os.path.join(self.workdir, "text", "spiece")

  @property
  def text_model(self) -> str:
    return self.text_prefix + ".model"

  @property
  def data(self) -> str:
    return os.path.join(self.workdir, "data")

  @property
  def parti(self) -> str:
    return os.path.join(self.workdir, "parti")


def is_end_to_end(config: ml_collections.ConfigDict) -> bool:
  return config.get("task") == "end_to_end"


def parti_config(config: ml_collections.ConfigDict, workdir: str
                 ) -> ml_collections.ConfigDict:
  """config.parti with the paths to this workdir's tokenizer and data."""
  paths = Paths(workdir)
  parti = ml_collections.ConfigDict(config.parti.to_dict())
  parti.tokenizer_workdir = paths.tokenizer
  parti.text_tokenizer = paths.text_model
  parti.data.pretokenized_dir = paths.data
  return parti


def _trained_step(workdir: str) -> int:
  """The latest checkpoint step in workdir (0 if none)."""
  if not os.path.isdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)):
    return 0
  manager = trainer.checkpoint_manager(workdir, read_only=True)
  try:
    return manager.latest_step() or 0
  finally:
    manager.close()


def _train(config, workdir: str, name: str) -> bool:
  """Trains (or resumes) one stage; False if it stopped early on request."""
  if _trained_step(workdir) >= config.total_steps:
    logging.info("Stage %s: already trained (%s); skipping.", name, workdir)
    return True
  state = experiments.train_and_evaluate(config, workdir)
  return int(state.step) >= config.total_steps


def _text_tokenizer(config, paths: Paths) -> None:
  if os.path.exists(paths.text_model):
    logging.info("Stage text: %s exists; skipping.", paths.text_model)
    return
  if config.text.source != "shapes":
    raise ValueError(f"config.text.source={config.text.source!r}; the "
                     "end-to-end recipe trains on 'shapes' captions.")
  _, captions, _ = shapes.generate(config.text.num_captions, config.text.seed)
  os.makedirs(os.path.dirname(paths.text_prefix), exist_ok=True)
  text_lib.train_sentencepiece([str(c) for c in captions],
                               config.text.vocab_size, paths.text_prefix,
                               model_type=config.text.model_type,
                               seed=config.text.seed)
  logging.info("Stage text: wrote %s.", paths.text_model)


def _pretokenize(config, paths: Paths) -> None:
  tokenizer_step = _trained_step(paths.tokenizer)
  tokenizer = None  # loaded once, when a split needs it
  for split, num in config.pretokenize.splits.items():
    meta_path = pretokenize.metadata_path(paths.data, split)
    if os.path.exists(meta_path):
      with open(meta_path) as f:
        meta = json.load(f)
      if (meta.get("num_examples") == num and
          meta.get("tokenizer_step") == tokenizer_step):
        logging.info("Stage data: %s is up to date; skipping.", meta_path)
        continue
    if tokenizer is None:
      tokenizer = api.load_tokenizer(paths.tokenizer)
    pretokenize.pretokenize(
        tokenizer, paths.text_model, config.pretokenize.source, split,
        paths.data, config.parti.model.text_length, num_examples=num,
        batch_size=config.pretokenize.batch_size,
        data_dir=config.pretokenize.get("data_dir"),
        tokenizer_workdir=paths.tokenizer)


def _samples(config, paths: Paths) -> list[str]:
  sampling = config.sampling
  return experiments.sample(
      paths.parti, prompts=list(config.prompts), seed=sampling.seed,
      cfg_scale=sampling.cfg_scale, temperature=sampling.temperature,
      top_k=sampling.top_k, top_p=sampling.top_p,
      output_dir=os.path.join(paths.parti, "samples"))


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage (skipping finished ones); returns Parti's report."""
  if jax.process_count() > 1:
    raise ValueError(
        "The end-to-end recipe runs on one host; on a multi-host slice run "
        "its stages as separate jobs (see the README: tokenizer, "
        "unimm.tools.train_text_tokenizer, unimm.tools.pretokenize, Parti).")
  with workdir_lock.hold(workdir):  # one recipe per workdir
    return _run(config, workdir)


def _run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  paths = Paths(workdir)
  start = time.time()
  lead = True

  def announce(index: int, name: str, what: str) -> None:
    if lead:
      logging.info("=== Stage %d/%d (%s): %s  [%.0f s so far]", index,
                   len(STAGES), name, what, time.time() - start)

  announce(1, "tokenizer", f"train the ViT-VQGAN in {paths.tokenizer}")
  if not _train(config.tokenizer, paths.tokenizer, "tokenizer"):
    return {}
  announce(2, "text", f"train SentencePiece -> {paths.text_model}")
  if lead:
    _text_tokenizer(config, paths)
  announce(3, "data", f"pre-tokenize into {paths.data}")
  if lead:
    _pretokenize(config, paths)
  announce(4, "parti", f"train and evaluate Parti in {paths.parti}")
  if not _train(parti_config(config, workdir), paths.parti, "parti"):
    return {}
  announce(5, "samples", f"sample {len(config.prompts)} prompts")
  if lead:
    _samples(config, paths)
  report_path = os.path.join(paths.parti, "eval", "report.json")
  with open(report_path) as f:
    report = json.load(f)
  if lead:
    summary = {k: report[k] for k in (
        "prompt_accuracy_single", "prompt_accuracy_pair", "probe_fd")
               if k in report}
    logging.info("Done in %.0f s: %s", time.time() - start, summary)
    print(f"End to end in {time.time() - start:.0f} s: "
          f"{json.dumps(summary)}\nReport: {report_path}\nSamples: "
          f"{os.path.join(paths.parti, 'samples', 'grid.png')}")
  return report
