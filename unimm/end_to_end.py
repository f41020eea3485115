"""The whole text-to-image recipe as one resumable job.

  python -m unimm.main --config configs/shapes_demo.py --workdir workdirs/demo
  python -m unimm.main --config configs/own_data.py:data=DIR --workdir W

runs, each stage in a subdirectory of the workdir:
  1. tokenizer/  train the ViT-VQGAN on pixels (config.tokenizer);
  2. text/       train a SentencePiece model on the data set's captions
                 (config.text: generated shapes captions, or every caption
                 of a converted data set's training split);
  3. data/       pre-tokenize image-caption pairs once with both frozen
                 tokenizers (config.pretokenize);
  4. parti/      train Parti on the shards and evaluate it:
                 parti/eval/report.json, and parti/eval/samples.png (shapes
                 probe) or heldout_samples.png (own data) (config.parti);
                 or, with model=interleaved, interleaved/: the
                 decoder-only model on packed documents (config.interleaved):
                 shapes caption->image, image->caption and edit documents,
                 or own data's pairs as caption->image and image->caption;
  5. MODEL/samples/  sample the prompts: one PNG each, grid.png, and the
                 prompts in prompts.txt (the stage is skipped while they
                 match).
A stage whose output is complete is skipped, so rerunning the command after
a stop (Ctrl-C, SIGTERM, preemption) resumes where it was. The stage configs
are ordinary experiment configs; the paths between stages are filled in here.

On a converted data set (configs/own_data.py sets config.own_data), the data
set is checked before any training (check_own_data: a converted directory,
its image size, non-empty splits), the text tokenizer is trained first so a
vocabulary the captions cannot fill fails before the image tokenizer
trains, training captions longer than Parti's text length are counted and
logged, and the sample grid's prompts are the first
config.own_data.num_prompts held-out captions.
"""
import dataclasses
import json
import os
import time

from absl import logging
from etils import epath
import jax
import ml_collections

from unimm import api
from unimm import experiments
from unimm.data import interleaved as il_data
from unimm.data import pipeline
from unimm.data import pretokenize
from unimm.data import shapes
from unimm.models import image_input as image_input_lib
from unimm.models import vocab as vocab_lib
from unimm.tokenizers import text as text_lib
from unimm.train import trainer
from unimm.train import workdir_lock

STAGES = ("tokenizer", "text", "data", "model", "samples")


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

  @property
  def interleaved(self) -> str:
    return os.path.join(self.workdir, "interleaved")

  def model(self, name: str) -> str:
    """The model stage's directory: parti/ or interleaved/."""
    return os.path.join(self.workdir, name)


def is_end_to_end(config: ml_collections.ConfigDict) -> bool:
  return config.get("task") == "end_to_end"


def model_name(config: ml_collections.ConfigDict) -> str:
  """The model the recipe trains: "interleaved" where the config holds an
  interleaved stage (model=interleaved of configs/shapes_demo.py or
  configs/own_data.py), else "parti"."""
  return "interleaved" if config.get("interleaved") is not None else "parti"


def model_config(config: ml_collections.ConfigDict, workdir: str
                 ) -> ml_collections.ConfigDict:
  """The model stage's config with this workdir's paths filled in."""
  if model_name(config) == "interleaved":
    paths = Paths(workdir)
    model = ml_collections.ConfigDict(config.interleaved.to_dict())
    model.tokenizer_workdir = paths.tokenizer
    model.text_tokenizer = paths.text_model
    model.data.packed_dir = paths.data
    if epath.Path(paths.text_model).exists():
      # The joint vocabulary holds the pieces SentencePiece made (captions
      # may support fewer than text_vocab; the packed rows use this many).
      text_vocab = text_lib.TextTokenizer.load(paths.text_model).vocab_size
      model.vocab.text_vocab_size = text_vocab
      layout = vocab_lib.VocabLayout(
          text_vocab, model.vocab.image_vocab_size,
          read_ids=image_input_lib.ImageInput.of(model.model).reads_images,
          location_bins=model.vocab.get("location_bins", 0))
      model.model.update(layout.model_ids())
    return model
  return parti_config(config, workdir)


def model_stage(config: ml_collections.ConfigDict, workdir: str
                ) -> tuple[ml_collections.ConfigDict, str]:
  """(the model stage's config, its directory): what --mode eval / sample /
  caption act on."""
  return (model_config(config, workdir),
          Paths(workdir).model(model_name(config)))


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
  if not epath.Path(workdir, trainer.CHECKPOINT_DIR).is_dir():
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


def _own_data(config) -> ml_collections.ConfigDict | None:
  """config.own_data (configs/own_data.py), or None for the shapes demo."""
  return config.get("own_data")


def check_own_data(config) -> dict:
  """Checks a converted data set before any training; returns its info.

  Raises:
    ValueError: the directory is not a converted data set, stores images of
      another size than config.own_data.image_size, or a split the recipe
      reads (config.own_data.read_splits) is missing or empty; each message
      names the setting to change.
  """
  own = _own_data(config)
  info = pipeline.converted_info(own.dir, setting="data")
  if info["image_size"] != own.image_size:
    raise ValueError(
        f"data={own.dir!r} stores {info['image_size']}x{info['image_size']} "
        f"images but image_size={own.image_size}; pass image_size="
        f"{info['image_size']} (configs/own_data.py:data=...,image_size="
        f"{info['image_size']}) or convert again with --image_size "
        f"{own.image_size}.")
  for name, split in own.read_splits.items():
    base = split.split("[")[0]
    if base not in info["splits"]:
      raise ValueError(
          f"data={own.dir!r} has splits {sorted(info['splits'])}; the "
          f"{name} split reads {split!r}. Convert it with `python -m "
          f"unimm.tools.convert --out {own.dir} --split {base} ...`.")
    if not info["splits"][base]:
      raise ValueError(
          f"The {base!r} split of data={own.dir!r} is empty (0 examples); "
          "expected images with captions: convert it again (see its "
          "convert_summary.json for what was skipped).")
    wanted = config.pretokenize.splits[name]
    if wanted <= 0:
      raise ValueError(
          f"The {name} split ({split!r} of data={own.dir!r}, splits "
          f"{info['splits']}) would be empty; lower num_heldout or convert "
          "more images.")
  return info


def _text_tokenizer(config, paths: Paths) -> None:
  if epath.Path(paths.text_model).exists():
    logging.info("Stage text: %s exists; skipping.", paths.text_model)
    return
  if _own_data(config) is not None:
    captions = pipeline.read_captions(config.text.source, config.text.split,
                                      setting="data")
    logging.info("Stage text: %d captions of %s (split %s).", len(captions),
                 config.text.source, config.text.split)
  elif config.text.source != "shapes":
    raise ValueError(f"config.text.source={config.text.source!r}; the "
                     "end-to-end recipe trains on 'shapes' captions (or a "
                     "converted data set: configs/own_data.py).")
  elif model_name(config) == "interleaved":
    # The shapes documents' texts: captions and edit instructions.
    captions = il_data.document_texts(config.text.num_captions,
                                      config.text.seed)
  else:
    _, captions, _ = shapes.generate(config.text.num_captions,
                                     config.text.seed)
    captions = [str(c) for c in captions]
  if model_name(config) == "interleaved" and _own_data(config) is not None:
    # Image-to-text documents ask for their caption with these words.
    captions += [il_data.CAPTION_PROMPT] * max(1, len(captions) // 20)
  epath.Path(paths.text_prefix).parent.mkdir(parents=True, exist_ok=True)
  try:
    text_lib.train_sentencepiece(captions, config.text.vocab_size,
                                 paths.text_prefix,
                                 model_type=config.text.model_type,
                                 seed=config.text.seed)
  except ValueError as e:
    raise ValueError(
        f"SentencePiece cannot train vocab_size={config.text.vocab_size} "
        f"pieces on the {len(captions)} training captions of "
        f"{config.text.source!r}: {e} (configs/own_data.py: the text_vocab "
        "argument; the shapes demo: config.text.vocab_size).") from e
  logging.info("Stage text: wrote %s.", paths.text_model)
  if _own_data(config) is not None:
    _count_long_captions(config, paths, captions)


def _text_length(config) -> int:
  """Text tokens a caption keeps, EOS included: Parti's text_length, or
  the interleaved documents' max_text_tokens pieces + 1."""
  if model_name(config) == "interleaved":
    return int(config.pretokenize.max_text_tokens) + 1
  return int(config.parti.model.text_length)


def _count_long_captions(config, paths: Paths, captions: list[str]) -> int:
  """Logs (and returns) how many captions exceed the model's text length."""
  tokenizer = text_lib.TextTokenizer.load(paths.text_model)
  lengths = tokenizer.count_tokens(captions) + 1  # EOS included
  text_length = _text_length(config)
  num_long = int((lengths > text_length).sum())
  log = logging.warning if num_long else logging.info
  log("Stage text: vocab_size %d; tokens per caption incl. EOS: mean %.1f, "
      "max %d; %d of %d captions exceed text_length=%d and will be "
      "truncated%s.", tokenizer.vocab_size, lengths.mean(), lengths.max(),
      num_long, len(captions), text_length,
      " (raise the text_length argument to keep them whole)"
      if num_long else "")
  return num_long


def _pretokenize(config, paths: Paths) -> None:
  tokenizer_step = _trained_step(paths.tokenizer)
  tokenizer = None  # loaded once, when a split needs it
  for split, num in config.pretokenize.splits.items():
    meta_path = pretokenize.metadata_path(paths.data, split)
    if epath.Path(meta_path).exists():
      meta = json.loads(epath.Path(meta_path).read_text())
      written = meta.get("num_examples", meta.get("num_documents"))
      if (written == num and
          meta.get("tokenizer_step") == tokenizer_step):
        logging.info("Stage data: %s is up to date; skipping.", meta_path)
        continue
    if tokenizer is None:
      tokenizer = api.load_tokenizer(paths.tokenizer)
    _write_split(config, paths, tokenizer, split, num)


def _write_split(config, paths: Paths, tokenizer, split: str, num: int):
  """One split of the data stage: shapes documents packed for the
  interleaved model, own pairs packed as documents, or Parti's pairs."""
  read_split = config.pretokenize.get("read_splits", {}).get(split, split)
  interleaved = model_name(config) == "interleaved"
  reading = (image_input_lib.ImageInput.of(config.interleaved.model)
             if interleaved else None)
  if interleaved and _own_data(config) is None:
    meta = il_data.write_interleaved(
        tokenizer, paths.text_model, paths.data, split, num,
        config.interleaved.model.max_len,
        encode_batch_size=config.pretokenize.batch_size,
        tokenizer_workdir=paths.tokenizer, image_input=reading)
    logging.info("Stage data: %s: %d shapes documents in %d rows.", split,
                 num, meta["num_rows"])
  elif interleaved:
    meta = il_data.write_pairs(
        tokenizer, paths.text_model, paths.data, split,
        source=config.pretokenize.source, read_split=read_split,
        length=config.interleaved.model.max_len, num_examples=num,
        max_text_tokens=int(config.pretokenize.max_text_tokens),
        encode_batch_size=config.pretokenize.batch_size,
        tokenizer_workdir=paths.tokenizer, image_input=reading)
    logging.info("Stage data: %s: %d pairs in %d documents, %d captions "
                 "cut to %d pieces.", split, meta["num_examples"],
                 meta["num_documents"], meta["num_truncated_captions"],
                 meta["max_text_tokens"])
  else:
    meta = pretokenize.pretokenize(
        tokenizer, paths.text_model, config.pretokenize.source, read_split,
        paths.data, config.parti.model.text_length, num_examples=num,
        batch_size=config.pretokenize.batch_size,
        data_dir=config.pretokenize.get("data_dir"),
        tokenizer_workdir=paths.tokenizer, out_split=split)
    logging.info("Stage data: %s: %d examples, %d captions truncated to "
                 "text_length=%d.", split, meta["num_examples"],
                 meta["num_truncated_captions"],
                 config.parti.model.text_length)


def _truncated_captions(paths: Paths) -> dict[str, int]:
  """Captions truncated per pre-tokenized split (from its metadata)."""
  counts = {}
  for path in sorted(epath.Path(paths.data).glob("*.json")):
    meta = json.loads(path.read_text())
    if "num_truncated_captions" in meta:
      counts[path.stem] = meta["num_truncated_captions"]
  return counts


def _prompts(config) -> list[str]:
  """config.prompts, or the first held-out captions of a converted set."""
  own = _own_data(config)
  if own is None:
    return list(config.prompts)
  captions = pipeline.read_captions(
      own.dir, own.read_splits["validation"], all_captions=False,
      setting="data")
  return captions[:own.num_prompts]


def _samples_done(output_dir: str, prompts: list[str]) -> bool:
  """Whether output_dir holds the grid of exactly these prompts."""
  listed = epath.Path(output_dir, "prompts.txt")
  if not epath.Path(output_dir, "grid.png").is_file() or not listed.is_file():
    return False
  return listed.read_text().splitlines() == prompts


def _samples(config, paths: Paths, prompts: list[str]) -> list[str]:
  sampling = config.sampling
  model_dir = paths.model(model_name(config))
  output_dir = os.path.join(model_dir, "samples")
  if _samples_done(output_dir, prompts):
    logging.info("Stage samples: %s holds the grid of these prompts; "
                 "skipping.", output_dir)
    return []
  written = experiments.sample(
      model_dir, prompts=prompts, seed=sampling.seed,
      cfg_scale=sampling.cfg_scale, temperature=sampling.temperature,
      top_k=sampling.top_k, top_p=sampling.top_p, output_dir=output_dir)
  epath.Path(output_dir, "prompts.txt").write_text(
      "".join(f"{prompt}\n" for prompt in prompts))
  return written


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs every stage (skipping finished ones); returns the model's
  report."""
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
  own = _own_data(config)

  def announce(index: int, name: str, what: str) -> None:
    if lead:
      logging.info("=== Stage %d/%d (%s): %s  [%.0f s so far]", index,
                   len(STAGES), name, what, time.time() - start)

  if own is not None:
    # Every check of the data set and the captions before any training.
    info = check_own_data(config)
    logging.info("Data set %s: %dx%d images, splits %s; reading %s.",
                 own.dir, info["image_size"], info["image_size"],
                 info["splits"], dict(own.read_splits))
    announce(2, "text", f"train SentencePiece -> {paths.text_model} first, "
             "so the captions are checked before any image training")
    if lead:
      _text_tokenizer(config, paths)
  announce(1, "tokenizer", f"train the ViT-VQGAN in {paths.tokenizer}")
  if not _train(config.tokenizer, paths.tokenizer, "tokenizer"):
    return {}
  announce(2, "text", f"train SentencePiece -> {paths.text_model}")
  if lead:
    _text_tokenizer(config, paths)
  announce(3, "data", f"pre-tokenize into {paths.data}")
  if lead:
    _pretokenize(config, paths)
  name = model_name(config)
  model_dir = paths.model(name)
  announce(4, name, f"train and evaluate the {name} model in {model_dir}")
  if not _train(model_config(config, workdir), model_dir, name):
    return {}
  prompts = _prompts(config)
  announce(5, "samples", f"sample {len(prompts)} prompts")
  if lead:
    _samples(config, paths, prompts)
  report_path = os.path.join(model_dir, "eval", "report.json")
  report = json.loads(epath.Path(report_path).read_text())
  if lead:
    keys = ("prompt_accuracy_single", "prompt_accuracy_pair", "probe_fd",
            "caption_accuracy", "edit_accuracy")
    if own is not None:
      keys += ("eval_loss", "eval_accuracy", "eval_text_loss",
               "eval_image_loss") + tuple(
          k for k in sorted(report) if k.startswith("retrieval_"))
    summary = {k: report[k] for k in keys if k in report}
    if own is not None:
      summary["truncated_captions"] = _truncated_captions(paths)
    logging.info("Done in %.0f s: %s", time.time() - start, summary)
    print(f"End to end in {time.time() - start:.0f} s: "
          f"{json.dumps(summary)}\nReport: {report_path}\nSamples: "
          f"{os.path.join(model_dir, 'samples', 'grid.png')}")
  return report
