"""The Parti task: next-image-token cross-entropy with CFG text dropout.

Training reads pre-tokenized shards (unimm.data.pretokenize: text ids and
the frozen ViT-VQGAN's image ids; images are never re-encoded). With
probability config.cfg_dropout each example's text is replaced by the
unconditional prompt [EOS, pad, ...] (Parti §3, after Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance"), so one model gives both the
conditional and the unconditional logits that guidance mixes at sampling.

Sampling is the inference layer's (`ParTask.sampler(params)` is a
unimm.inference.TextToImageModel over the params being trained, with the
frozen tokenizer of config.tokenizer_workdir). `evaluate` writes
eval/report.json with, on any data, the held-out loss and the model's own
caption-image retrieval (the true caption ranked among N held-out captions
by log p(image | caption); unimm.evaluation.retrieval). On shapes data it
also scores samples of a fixed shapes prompt set with the probe classifier
(prompt accuracy per attribute, Fréchet distance in probe features) and
writes eval/samples.png; on other data it writes eval/heldout_samples.png,
held-out captions with their true images beside the samples.
"""
import functools
import os
import time
from typing import Any

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm import checkpoints
from unimm import config_lib
from unimm.data import pipeline
from unimm.data import pretokenize
from unimm.data import shapes
from unimm.evaluation import generation_metrics
from unimm.evaluation import grids
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import reports
from unimm.evaluation import retrieval
from unimm.inference import text_to_image
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import parti
from unimm.tokenizers import text as text_lib

EVAL_DEFAULTS = dict(
    num_single=200,  # one-object prompts of the fixed prompt set
    num_pair=200,  # two-object prompts
    prompt_seed=None,  # fixed prompt set seed (None = probe.PROMPT_SEED)
    seed=0,  # sampling seed
    # batch_size, cfg_scale (None / "" disables guidance), temperature,
    # top_k, top_p: what the API samples with too.
    **text_to_image.SAMPLING_DEFAULTS,
    loss_split="validation",  # held-out pre-tokenized split ("" = skip)
    num_loss_examples=2048,
    num_grid_samples=32,
    # Caption retrieval over the first N pairs of loss_split (N^2 scored
    # pairs; 0 = off).
    retrieval_pairs=32,
    # FID / CLIP score (unimm.evaluation.generation_metrics; off if empty).
    **generation_metrics.CONFIG_DEFAULTS,
)


def apply_cfg_dropout(text_ids, rng, rate: float, unconditional_row):
  """Replaces each row of text_ids [B, S] by unconditional_row [S] w.p. rate.

  Returns (text_ids [B, S], dropped bool [B]). Parti §3: training with the
  text dropped gives the unconditional model classifier-free guidance needs.
  """
  dropped = jax.random.bernoulli(rng, rate, (text_ids.shape[0],))  # [B]
  text_ids = jnp.where(dropped[:, None], unconditional_row[None, :].astype(
      text_ids.dtype), text_ids)
  return text_ids, dropped


@functools.lru_cache(maxsize=8)
def _jitted_scores(model: parti.Parti):
  """(params, text_ids [B, S], image_ids [B, T]) -> (log p(image_ids |
  text_ids) [B] summed over the image tokens, token accuracy [B], tokens
  scored [B]: T, or the codes + EOI of a variable-length image); teacher
  forcing, no dropout. Cached per model: tasks of one model share it."""
  def scores(params, text_ids, image_ids):
    logits = model.apply({"params": params}, text_ids, image_ids,
                         deterministic=True).astype(jnp.float32)
    targets, weights = parti.image_targets(model, image_ids)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    correct = (jnp.argmax(logits, -1) == targets) * weights
    count = jnp.sum(weights, -1)
    return -jnp.sum(ce * weights, -1), jnp.sum(correct, -1) / count, count
  return jax.jit(scores)


class ParTask:
  """Task for unimm.train.trainer: Parti on pre-tokenized image ids."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.model = config_lib.build_module(parti.Parti, config.model)
    self.cfg_dropout = float(config.get("cfg_dropout", 0.1))
    if not 0.0 <= self.cfg_dropout < 1.0:
      raise ValueError(f"config.cfg_dropout={self.cfg_dropout}; expected a "
                       "probability in [0, 1) (Parti uses 0.1).")
    self.eval_config = config_lib.with_defaults(EVAL_DEFAULTS, config, "eval")
    config_lib.check_counts(
        config, "eval", positive=("batch_size", "num_loss_examples",
                                  "metrics_num_images"),
        non_negative=("num_single", "num_pair", "num_grid_samples",
                      "retrieval_pairs"))
    self._text_tokenizer = None
    self._image_tokenizer = None

  # ------------------------------------------------------------ tokenizers

  @property
  def pretokenized_dir(self) -> str:
    return self.config.data.get("pretokenized_dir") or ""

  @property
  def text_tokenizer(self) -> text_lib.TextTokenizer:
    """config.text_tokenizer, else the copy in config.data.pretokenized_dir."""
    if self._text_tokenizer is None:
      path = self.config.get("text_tokenizer") or ""
      if not path and self.pretokenized_dir:
        path = os.path.join(self.pretokenized_dir,
                            pretokenize.TEXT_TOKENIZER_FILE)
      if not path or not epath.Path(path).exists():
        raise ValueError(
            f"No text tokenizer: config.text_tokenizer={path!r} does not "
            "exist and config.data.pretokenized_dir has no "
            f"{pretokenize.TEXT_TOKENIZER_FILE}; set config.text_tokenizer to "
            "a SentencePiece .model (python -m "
            "unimm.tools.train_text_tokenizer).")
      tokenizer = text_lib.TextTokenizer.load(path)
      text_to_image.check_text_tokenizer(tokenizer, self.model, path)
      self._text_tokenizer = tokenizer
    return self._text_tokenizer

  @property
  def image_tokenizer(self) -> tokenizer_lib.Tokenizer:
    """The frozen ViT-VQGAN of config.tokenizer_workdir (decodes samples)."""
    if self._image_tokenizer is None:
      workdir = self.config.get("tokenizer_workdir") or ""
      if not workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to the "
                         "workdir of the trained ViT-VQGAN.")
      tokenizer = tokenizer_lib.load_tokenizer(workdir)
      text_to_image.check_image_tokenizer(tokenizer, self.model)
      self._image_tokenizer = tokenizer
    return self._image_tokenizer

  def dependencies(self) -> dict[str, str]:
    """Fingerprints of the frozen tokenizers (saved with the checkpoints;
    loading the model checks them); only those the config names."""
    found = {}
    if self.config.get("tokenizer_workdir"):
      found["tokenizer_workdir"] = tokenizer_lib.fingerprint(
          self.image_tokenizer)
    if self.config.get("text_tokenizer") or self.pretokenized_dir:
      found["text_tokenizer"] = checkpoints.text_fingerprint(
          self.text_tokenizer.model_proto)
    return found

  def sampler(self, params) -> text_to_image.TextToImageModel:
    """The inference model over `params` (what load_model gives for a
    checkpoint of them), sampling with the eval's settings."""
    return text_to_image.TextToImageModel(
        self.model, params, self.text_tokenizer, self.image_tokenizer,
        self.config)

  def unconditional_row(self) -> np.ndarray:
    return text_to_image.unconditional_text_ids(self.text_tokenizer.eos_id,
                                                self.model.text_length)

  # ------------------------------------------------------------------ data

  def data_source(self) -> str:
    """What the model trains on: the `source` recorded in the pre-tokenized
    train split's metadata (else loss_split's), else config.data.source;
    "" when none is known."""
    d = self.pretokenized_dir
    for split in ("train", self.eval_config["loss_split"]):
      if d and split and epath.Path(
          pretokenize.metadata_path(d, split)).is_file():
        source = pretokenize.load_metadata(d, split).get("source") or ""
        if source:
          return str(source)
    return str(self.config.data.get("source") or "")

  def on_shapes_data(self) -> bool:
    """Whether the shapes probe can judge this model's samples: its data is
    a shapes source (or unknown, as before sources were recorded)."""
    source = self.data_source()
    return not source or source in pipeline.SHAPES_SOURCES

  def check_metadata(self, metadata: dict[str, Any]) -> None:
    """Fails early if the shards do not fit config.model."""
    m, d = self.model, self.pretokenized_dir
    checks = (
        ("image_length", metadata["image_length"], m.image_length),
        ("image_vocab_size", metadata["num_codes"], m.image_vocab_size),
        ("text_length", metadata["text_length"], m.text_length),
    )
    dynamic = metadata.get("end_of_image")
    if dynamic is None:  # metadata without the key: LaVIT's spans are short
      dynamic = (metadata.get("tokens_per_image_mean", m.image_length)
                 < metadata["image_length"])
    dynamic = bool(dynamic)
    if dynamic != bool(m.end_of_image):
      raise ValueError(
          f"Pre-tokenized data in {d!r} holds "
          + ("variable-length images (a LaVIT tokenizer's kept codes)"
             if dynamic else "fixed-length images")
          + f" but config.model.end_of_image={bool(m.end_of_image)}; train "
          f"with configs/parti_shapes.py:dynamic={int(dynamic)}, or "
          "re-run unimm.tools.pretokenize with the tokenizer this model is "
          "for.")
    grid = metadata.get("grid")
    for name, have, want in checks:
      if have != want:
        hint = ""
        if (name == "image_length" and not dynamic and grid
            and grid[0] == 1):
          hint = (f" (the data's tokenizer writes {have} 1-D tokens: "
                  f"configs/parti_shapes.py:tokens={have})")
        raise ValueError(
            f"Pre-tokenized data in {d!r} has {name}={have} but "
            f"config.model.{name}={want}{hint}; re-run "
            "unimm.tools.pretokenize for this model or change the config.")
    if metadata["text_vocab_size"] > m.text_vocab_size:
      raise ValueError(
          f"Pre-tokenized data in {d!r} uses {metadata['text_vocab_size']} "
          f"text ids but config.model.text_vocab_size={m.text_vocab_size}.")

  def _dataset(self, split, batch_size, *, shuffle, seed, num_epochs,
               process_index=0, process_count=1, drop_remainder=True,
               draw_caption=False):
    """Batches of `split`; draw_caption: one of each record's captions per
    example and epoch (pretokenize.caption_index), else the first."""
    if not self.pretokenized_dir:
      raise ValueError("config.data.pretokenized_dir is empty; pre-tokenize "
                       "first (python -m unimm.tools.pretokenize --out DIR).")
    self.check_metadata(pretokenize.load_metadata(self.pretokenized_dir,
                                                  split))
    return pretokenize.pretokenized_dataset(
        self.pretokenized_dir, split=split, batch_size=batch_size,
        shuffle=shuffle, seed=seed, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        worker_count=self.config.data.get("worker_count", 0),
        drop_remainder=drop_remainder, draw_caption=draw_caption)

  def train_data(self, process_index: int, process_count: int):
    """Training batches: a record with several captions gives one of them
    per epoch, drawn from (config.seed, epoch, record index), so a resumed
    run draws the same; held-out reads keep the first caption."""
    batch_size = config_lib.per_host_batch_size(self.config, process_count)
    return self._dataset("train", batch_size, shuffle=True,
                         seed=self.config.seed, num_epochs=None,
                         process_index=process_index,
                         process_count=process_count, draw_caption=True)

  # ------------------------------------------------------------ init, loss

  def init(self, rng, batch):
    text_ids = jnp.asarray(batch["text_ids"])  # [B, S]
    image_ids = jnp.asarray(batch["image_ids"])  # [B, T]
    m = self.model
    if text_ids.shape[1:] != (m.text_length,) or image_ids.shape[1:] != (
        m.image_length,):
      raise ValueError(
          f"Batch text_ids {text_ids.shape} / image_ids {image_ids.shape}; "
          f"expected [B, {m.text_length}] / [B, {m.image_length}] "
          "(config.model.text_length / image_length).")
    # jit: op-by-op init is slow; inside the trainer's jit this is a no-op.
    variables = jax.jit(m.init)({"params": rng, "dropout": rng}, text_ids,
                                image_ids)
    checkpoint = self.config.get("t5_checkpoint") or ""
    if checkpoint:  # Parti §2.2: start the text encoder from a trained T5.
      variables = parti.load_t5_into(variables, checkpoint)
    return variables["params"], {}

  def logits(self, params, text_ids, image_ids, *, rng=None):
    """Teacher-forced logits [B, T, V] (dropout on when rng is given)."""
    rngs = {} if rng is None else {"dropout": rng}
    return self.model.apply({"params": nn.unbox(params)}, text_ids,
                            image_ids, deterministic=rng is None, rngs=rngs)

  def loss(self, params, model_state, batch, rng):
    text_ids, image_ids = batch["text_ids"], batch["image_ids"]
    drop_rng, dropout_rng = jax.random.split(rng)
    dropped = jnp.zeros((text_ids.shape[0],), bool)
    if self.cfg_dropout > 0:
      text_ids, dropped = apply_cfg_dropout(
          text_ids, drop_rng, self.cfg_dropout,
          jnp.asarray(self.unconditional_row()))
    logits = self.logits(params, text_ids, image_ids, rng=dropout_rng)
    logits = logits.astype(jnp.float32)  # [B, T, V]
    # Mean cross-entropy over image tokens (Parti §2.2); a variable-length
    # image counts its codes and its EOI.
    targets, weights = parti.image_targets(self.model, image_ids)
    count = jnp.maximum(jnp.sum(weights), 1.0)
    loss = jnp.sum(optax.softmax_cross_entropy_with_integer_labels(
        logits, targets) * weights) / count
    accuracy = jnp.sum((jnp.argmax(logits, -1) == targets) * weights) / count
    metrics = {"loss": loss, "accuracy": accuracy,
               "perplexity": jnp.exp(loss),
               "text_dropped": dropped.astype(jnp.float32).mean()}
    return loss, (metrics, model_state)

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # ------------------------------------------------------------------ eval

  def _scores(self, params, text_ids, image_ids):
    """Teacher-forced (log p(image_ids | text_ids) [B], token accuracy [B],
    tokens scored [B]): the log-probability summed over the image tokens,
    no dropout; one compiled program per model and batch shape."""
    return _jitted_scores(self.model)(nn.unbox(params), text_ids, image_ids)

  def token_loss(self, params, batches, max_examples: int) -> dict:
    """Mean token cross-entropy/accuracy of full-text batches (no dropout)."""
    params = nn.unbox(params)
    losses, accuracies, seen, size = [], [], 0, None
    for batch in batches:
      text_ids = np.asarray(batch["text_ids"])  # [B, S]
      image_ids = np.asarray(batch["image_ids"])  # [B, T]
      count = min(len(text_ids), max_examples - seen)
      size = size or len(text_ids)
      if len(text_ids) < size:  # pad a final partial batch: no recompile
        text_ids, image_ids = (np.concatenate([x, np.repeat(
            x[:1], size - len(x), axis=0)]) for x in (text_ids, image_ids))
      log_prob, acc, scored = self._scores(params, text_ids, image_ids)
      losses.append(-np.asarray(log_prob)[:count] / np.asarray(scored)[:count])
      accuracies.append(np.asarray(acc)[:count])
      seen += count
      if seen >= max_examples:
        break
    if not seen:
      return {}
    loss = float(np.concatenate(losses).mean())
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss)),
            "eval_accuracy": float(np.concatenate(accuracies).mean()),
            "eval_loss_examples": int(seen)}

  def heldout_examples(self, count: int) -> dict[str, Any] | None:
    """The first `count` examples of config.eval.loss_split (data set
    order): {"text_ids" int32 [n, S], "image_ids" int32 [n, T], "captions"
    [n]}, n <= count; None without that split (or for count 0)."""
    split = self.eval_config["loss_split"]
    d = self.pretokenized_dir
    if count <= 0 or not split or not d or not epath.Path(
        pretokenize.metadata_path(d, split)).is_file():
      return None
    self.check_metadata(pretokenize.load_metadata(d, split))
    source = pretokenize.pretokenized_source(d, split)
    examples = [pretokenize.parse_example(source[i])
                for i in range(min(count, len(source)))]
    if not examples:
      return None
    return {"text_ids": np.stack([e["text_ids"] for e in examples]),
            "image_ids": np.stack([e["image_ids"] for e in examples]),
            "captions": [e["caption"] for e in examples]}

  def retrieval_scores(self, params, text_ids, image_ids) -> np.ndarray:
    """scores [N, N]: [i, j] = log p(image_ids[i] | text_ids[j]), summed
    over the image tokens (teacher forcing, one forward per pair, in
    batches of config.eval.batch_size pairs)."""
    params = nn.unbox(params)
    text_ids, image_ids = np.asarray(text_ids), np.asarray(image_ids)

    def score_pairs(images, captions):
      return self._scores(params, text_ids[captions], image_ids[images])[0]
    return retrieval.score_matrix(
        score_pairs, len(image_ids), num_captions=len(text_ids),
        batch_size=int(self.eval_config["batch_size"]))

  def _retrieval(self, params, heldout) -> dict:
    """R@1 / R@5 of the true caption among the first
    config.eval.retrieval_pairs held-out pairs (needs at least 2)."""
    n = int(self.eval_config["retrieval_pairs"])
    if heldout is None or n < 2 or len(heldout["captions"]) < 2:
      return {}
    scores = self.retrieval_scores(params, heldout["text_ids"][:n],
                                   heldout["image_ids"][:n])
    return retrieval.recall_at_k(scores, captions=heldout["captions"][:n])

  def _heldout_grid(self, sampler, heldout, out_dir: str) -> int:
    """Writes eval/heldout_samples.png: for the first
    config.eval.num_grid_samples held-out pairs, the true image (the frozen
    tokenizer's reconstruction: its decoding of the held-out image ids)
    beside a sample for the caption; and eval/heldout_captions.txt (one
    caption a line, in grid order). Returns the number of pairs."""
    cfg = self.eval_config
    count = int(cfg["num_grid_samples"])
    if heldout is None or count <= 0:
      return 0
    captions = heldout["captions"][:count]
    batch_size = int(cfg["batch_size"])
    true = sampler.decode(heldout["image_ids"][:count], batch_size)
    samples = sampler.sample(captions, seed=int(cfg["seed"]))
    if jax.process_index() == 0:
      epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
      grids.save_image_grid(grids.side_by_side(true, samples), captions,
                            os.path.join(out_dir, "heldout_samples.png"),
                            columns=4)
      epath.Path(out_dir, "heldout_captions.txt").write_text("".join(
          " ".join(c.split()) + "\n" for c in captions))
    return len(captions)

  def _heldout_loss(self, params) -> dict:
    split = self.eval_config["loss_split"]
    if not split or not self.pretokenized_dir or not epath.Path(
        pretokenize.metadata_path(self.pretokenized_dir, split)).is_file():
      return {}
    batch_size = int(self.eval_config["batch_size"])
    data = self._dataset(split, batch_size, shuffle=False, seed=0,
                         num_epochs=1, drop_remainder=False)
    return self.token_loss(params, iter(data),
                           int(self.eval_config["num_loss_examples"]))

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """Held-out loss, caption retrieval and samples; eval/ files.

    On any data: the held-out loss of config.eval.loss_split (eval_loss,
    eval_accuracy, eval_perplexity) and caption retrieval over its first
    config.eval.retrieval_pairs pairs (retrieval_r1 / _r5 against
    retrieval_chance_r1 / _r5). On shapes data (on_shapes_data): the
    probe's prompt accuracy and Fréchet distance of samples of the fixed
    prompt set, and eval/samples.png. On other data the probe cannot judge
    the samples: eval/heldout_samples.png instead (_heldout_grid). Samples
    with the settings load_model's sample() defaults to (config.eval).
    With config.eval.inception_weights / clip_dir set, also FID / CLIP
    score over config.eval.metrics_prompts
    (unimm.evaluation.generation_metrics).
    """
    del model_state
    cfg = self.eval_config
    start = time.time()
    metrics_on = generation_metrics.check_eval_config(cfg)  # before sampling
    sampler = self.sampler(params)
    cfg_scale = sampler.sampling_params().cfg_scale  # validated here
    out_dir = os.path.join(workdir, "eval")
    on_shapes = self.on_shapes_data()
    heldout = self.heldout_examples(max(
        int(cfg["retrieval_pairs"]),
        0 if on_shapes else int(cfg["num_grid_samples"])))
    result, grid, image_size = {}, None, None
    if on_shapes:
      result, grid, image_size = self._probe_eval(sampler)
    else:
      logging.info("Data source %r is not shapes: no probe; held-out "
                   "captions with their samples in %s.", self.data_source(),
                   os.path.join(out_dir, "heldout_samples.png"))
      result["heldout_grid_samples"] = self._heldout_grid(sampler, heldout,
                                                          out_dir)
    result.update(self._heldout_loss(params))
    result.update(self._retrieval(params, heldout))
    if metrics_on:  # FID / CLIP score; batch i samples with seed + 1 + i
      result.update(generation_metrics.from_eval_config(
          cfg, lambda prompts, i: sampler.sample(
              prompts, seed=int(cfg["seed"]) + 1 + i),
          workdir=workdir,
          image_size=image_size or self.image_tokenizer.image_size,
          default_source=self.data_source(),
          data_dir=self.config.data.get("data_dir")))
    result.update(steps=int(step), cfg_scale=cfg_scale,
                  eval_seconds=time.time() - start)
    result = reports.write_report(os.path.join(out_dir, "report.json"),
                                  result)
    if grid is not None and jax.process_index() == 0:
      grids.save_image_grid(*grid, os.path.join(out_dir, "samples.png"))
    return {k: v for k, v in result.items() if v is not None}

  def _probe_eval(self, sampler) -> tuple[dict, tuple | None, int]:
    """The shapes probe on samples of the fixed prompt set: (metrics:
    prompt accuracy per attribute, probe_fd, the tokenizer's ceiling,
    num_prompts; (images, captions) for eval/samples.png, or None when
    config.eval.num_grid_samples is 0; the samples' size)."""
    cfg = self.eval_config
    seed_kw = {} if cfg["prompt_seed"] is None else {
        "seed": int(cfg["prompt_seed"])}
    prompt_set = probe_lib.fixed_prompt_set(
        int(cfg["num_single"]), int(cfg["num_pair"]), **seed_kw)
    captions = [caption for caption, _ in prompt_set]
    images = sampler.sample(captions, seed=int(cfg["seed"]))
    image_size = images.shape[1]
    probe = probe_lib.get_probe(image_size)
    result = dict(probe_lib.prompt_accuracy(captions, images, probe=probe))
    # Fréchet distance in probe features to renders of the same scenes.
    real = np.stack([shapes.render(scene, image_size)
                     for _, scene in prompt_set])
    result["probe_fd"] = float(probe_lib.probe_fd(real, images, probe=probe))
    # The same prompts' true scenes through the tokenizer: this model's
    # ceiling (its samples are decoded by the same decoder).
    ceiling = probe_lib.reconstruction_accuracy(
        lambda x: self.image_tokenizer.decode(self.image_tokenizer.encode(x)),
        int(cfg["num_single"]), int(cfg["num_pair"]), image_size,
        probe=probe, **seed_kw)
    for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
      result[f"reconstructed_{key}"] = ceiling[key]
    result["num_prompts"] = len(captions)
    count = int(cfg["num_grid_samples"])
    # Half single-object, half two-object prompts in the grid.
    single = int(cfg["num_single"])
    picks = (list(range(min(count // 2, single))) +
             list(range(single, min(single + count - count // 2,
                                    len(captions)))))
    grid = (images[picks], [captions[i] for i in picks]) if picks else None
    return result, grid, image_size
