"""The Parti task: next-image-token cross-entropy with CFG text dropout.

Training reads pre-tokenized shards (unimm.data.pretokenize: text ids and
the frozen ViT-VQGAN's image ids; images are never re-encoded). With
probability config.cfg_dropout each example's text is replaced by the
unconditional prompt [EOS, pad, ...] (Parti §3, after Ho & Salimans 2022,
"Classifier-Free Diffusion Guidance"), so one model gives both the
conditional and the unconditional logits that guidance mixes at sampling.

Host-side sampling (`ParTask.sample`) tokenizes prompts, runs one jitted
`parti.sample_image_ids` per batch (compiled once per SamplingParams) and
decodes the ids with the frozen tokenizer (config.tokenizer_workdir).
`evaluate` scores samples of a fixed shapes prompt set with the probe
classifier (prompt accuracy per attribute, Fréchet distance in probe
features) and writes eval/report.json and eval/samples.png.
"""
import json
import math
import os
import time
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm import config_lib
from unimm import parallel
from unimm.data import pretokenize
from unimm.models import parti
from unimm.sampling.sampler import SamplingParams

EVAL_DEFAULTS = dict(
    num_single=200,  # one-object prompts of the fixed prompt set
    num_pair=200,  # two-object prompts
    prompt_seed=None,  # fixed prompt set seed (None = probe.PROMPT_SEED)
    seed=0,  # sampling seed
    batch_size=64,
    cfg_scale=3.0,  # None / "" disables guidance
    temperature=1.0,
    top_k=0,
    top_p=1.0,
    loss_split="validation",  # held-out pre-tokenized split ("" = skip)
    num_loss_examples=2048,
    num_grid_samples=32,
    # FID / CLIP score (unimm.evaluation.generation_metrics; off if empty).
    inception_weights="",
    fid_reference="",
    clip_dir="",
    metrics_prompts="",
    metrics_num_images=1000,
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


def unconditional_text_ids(eos_id: int, text_length: int) -> np.ndarray:
  """The empty prompt as the text tokenizer writes it: [eos, 0, 0, ...]."""
  row = np.zeros((text_length,), np.int32)
  row[0] = eos_id
  return row


def estimate_sampling_bytes(model: parti.Parti, rows: int) -> int:
  """Rough device bytes of one sampling call with `rows` rows (2B with CFG).

  The KV cache (self + cross, [L, rows, len, K, H]) dominates; activations
  are bounded by a few [rows, text_length, max(mlp, 4 D)] float32 buffers of
  the encoder and the [rows, V] logits of each step.
  """
  itemsize = jnp.dtype(model.dtype).itemsize
  cache = (2 * model.decoder_layers * rows *
           (model.image_length + model.text_length) * model.num_kv_heads *
           model.head_dim * itemsize)
  width = max(model.mlp_dim, 4 * model.embed_dim,
              model.num_heads * model.text_length)
  activations = 4 * rows * model.text_length * width * 4
  logits = 4 * rows * (model.image_vocab_size + model.embed_dim) * 4
  tokens = rows * (model.image_length + model.text_length) * 4
  return int(cache + activations + logits + tokens)


def available_bytes(devices: Sequence[jax.Device]) -> tuple[int, str]:
  """(free bytes per device, where) from the device, else host RAM (CPU)."""
  stats = None
  try:
    stats = devices[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  # unsupported backend
    stats = None
  if stats and "bytes_limit" in stats:
    free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
    return free, f"{devices[0].platform} device memory"
  import psutil  # pylint: disable=g-import-not-at-top
  return int(psutil.virtual_memory().available), "host memory"


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
    self._text_tokenizer = None
    self._image_tokenizer = None
    self._sample_fns = {}
    self._loss_fn = None
    self._mesh = None

  # ------------------------------------------------------------ tokenizers

  @property
  def pretokenized_dir(self) -> str:
    return self.config.data.get("pretokenized_dir") or ""

  @property
  def text_tokenizer(self):
    """config.text_tokenizer, else the copy in config.data.pretokenized_dir."""
    if self._text_tokenizer is None:
      from unimm.tokenizers import text as text_lib  # pylint: disable=g-import-not-at-top
      path = self.config.get("text_tokenizer") or ""
      if not path and self.pretokenized_dir:
        path = os.path.join(self.pretokenized_dir,
                            pretokenize.TEXT_TOKENIZER_FILE)
      if not path or not os.path.exists(path):
        raise ValueError(
            f"No text tokenizer: config.text_tokenizer={path!r} does not "
            "exist and config.data.pretokenized_dir has no "
            f"{pretokenize.TEXT_TOKENIZER_FILE}; set config.text_tokenizer to "
            "a SentencePiece .model (python -m unimm.tokenizers.text).")
      tokenizer = text_lib.TextTokenizer.load(path)
      if tokenizer.pad_id != 0 or tokenizer.eos_id < 0:
        raise ValueError(
            f"Text tokenizer {path!r} has pad_id={tokenizer.pad_id}, eos_id="
            f"{tokenizer.eos_id}; Parti needs pad 0 and an EOS (T5 layout, "
            "as unimm.tokenizers.text.train_sentencepiece writes).")
      if tokenizer.vocab_size > self.model.text_vocab_size:
        raise ValueError(
            f"Text tokenizer {path!r} has {tokenizer.vocab_size} pieces but "
            f"config.model.text_vocab_size={self.model.text_vocab_size}; "
            "raise config.model.text_vocab_size (config arg text_vocab=...).")
      self._text_tokenizer = tokenizer
    return self._text_tokenizer

  @property
  def image_tokenizer(self):
    """The frozen ViT-VQGAN of config.tokenizer_workdir (decodes samples)."""
    if self._image_tokenizer is None:
      from unimm import api  # pylint: disable=g-import-not-at-top
      workdir = self.config.get("tokenizer_workdir") or ""
      if not workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to the "
                         "workdir of the trained ViT-VQGAN.")
      tokenizer = api.load_tokenizer(workdir)
      h, w = tokenizer.grid
      if (tokenizer.num_codes != self.model.image_vocab_size or
          h * w != self.model.image_length):
        raise ValueError(
            f"The tokenizer in {workdir!r} has {tokenizer.num_codes} codes "
            f"and a {h}x{w} grid; config.model has image_vocab_size="
            f"{self.model.image_vocab_size}, image_length="
            f"{self.model.image_length}. Make them match (config args codes="
            "..., grid=...).")
      self._image_tokenizer = tokenizer
    return self._image_tokenizer

  def unconditional_row(self) -> np.ndarray:
    return unconditional_text_ids(self.text_tokenizer.eos_id,
                                  self.model.text_length)

  # ------------------------------------------------------------------ data

  def check_metadata(self, metadata: dict[str, Any]) -> None:
    """Fails early if the shards do not fit config.model."""
    m, d = self.model, self.pretokenized_dir
    checks = (
        ("image_length", metadata["image_length"], m.image_length),
        ("image_vocab_size", metadata["num_codes"], m.image_vocab_size),
        ("text_length", metadata["text_length"], m.text_length),
    )
    for name, have, want in checks:
      if have != want:
        raise ValueError(
            f"Pre-tokenized data in {d!r} has {name}={have} but "
            f"config.model.{name}={want}; re-run unimm.data.pretokenize for "
            "this model or change the config.")
    if metadata["text_vocab_size"] > m.text_vocab_size:
      raise ValueError(
          f"Pre-tokenized data in {d!r} uses {metadata['text_vocab_size']} "
          f"text ids but config.model.text_vocab_size={m.text_vocab_size}.")

  def _dataset(self, split, batch_size, *, shuffle, seed, num_epochs,
               process_index=0, process_count=1, drop_remainder=True):
    if not self.pretokenized_dir:
      raise ValueError("config.data.pretokenized_dir is empty; pre-tokenize "
                       "first (python -m unimm.data.pretokenize --out DIR).")
    self.check_metadata(pretokenize.load_metadata(self.pretokenized_dir,
                                                  split))
    return pretokenize.pretokenized_dataset(
        self.pretokenized_dir, split=split, batch_size=batch_size,
        shuffle=shuffle, seed=seed, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        worker_count=self.config.data.get("worker_count", 0),
        drop_remainder=drop_remainder)

  def train_data(self, process_index: int, process_count: int):
    from unimm.train import tasks  # pylint: disable=g-import-not-at-top
    batch_size = tasks.per_host_batch_size(self.config, process_count)
    return self._dataset("train", batch_size, shuffle=True,
                         seed=self.config.seed, num_epochs=None,
                         process_index=process_index,
                         process_count=process_count)

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
    # Mean cross-entropy over image tokens (Parti §2.2).
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, image_ids).mean()
    accuracy = (jnp.argmax(logits, -1) == image_ids).mean()
    metrics = {"loss": loss, "accuracy": accuracy,
               "perplexity": jnp.exp(loss),
               "text_dropped": dropped.astype(jnp.float32).mean()}
    return loss, (metrics, model_state)

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # -------------------------------------------------------------- sampling

  @property
  def mesh(self) -> jax.sharding.Mesh:
    if self._mesh is None:
      self._mesh = parallel.make_mesh(self.config.mesh)
    return self._mesh

  def _rules(self):
    rules = self.config.get("logical_axis_rules")
    return tuple(parallel.STANDARD_RULES if rules is None else rules)

  def _batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a]
                     for a in parallel.batch_axes(self._rules()))

  def _on_mesh(self, params):
    """Params on this task's mesh (replicated if they live elsewhere)."""
    params = nn.unbox(params)
    devices = set(self.mesh.devices.flat)
    leaves = jax.tree.leaves(params)
    if all(isinstance(x, jax.Array) and x.sharding.device_set == devices
           for x in leaves):
      return params
    return jax.device_put(params, parallel.replicated(self.mesh))

  def _sample_fn(self, sampling: SamplingParams):
    if sampling not in self._sample_fns:
      model = self.model

      def sample(params, text_ids, rng, uncond_text_ids):
        return parti.sample_image_ids(model, {"params": params}, text_ids,
                                      rng, sampling, uncond_text_ids)

      self._sample_fns[sampling] = jax.jit(sample)
    return self._sample_fns[sampling]

  def check_memory(self, batch_size: int, guided: bool) -> None:
    """ValueError if one sampling batch will not fit (a rough estimate)."""
    rows = batch_size * (2 if guided else 1)
    devices = list(self.mesh.devices.flat)
    on_host = devices[0].platform == "cpu"
    # Rows are split over the batch shards; CPU devices share host memory.
    need = estimate_sampling_bytes(self.model, rows)
    if not on_host:
      need //= self._batch_shards()
    free, where = available_bytes(devices)
    if need > free:
      raise ValueError(
          f"Sampling {batch_size} prompts per batch"
          f"{' with CFG (2x rows)' if guided else ''} needs about "
          f"{need / 2**30:.2f} GiB (KV cache + activations) but "
          f"{free / 2**30:.2f} GiB of {where} is free; lower batch_size "
          "(config.eval.batch_size / sample(batch_size=...)).")

  def sample_ids(self, params, prompts: Sequence[str], *, seed: int = 0,
                 cfg_scale: float | None = None, temperature: float = 1.0,
                 top_k: int = 0, top_p: float = 1.0,
                 batch_size: int | None = None) -> np.ndarray:
    """Image ids int32 [N, image_length] for N prompts (see `sample`)."""
    if isinstance(prompts, (str, bytes)):
      raise ValueError(f"prompts must be a list of strings, got one "
                       f"{type(prompts).__name__}; wrap it in a list.")
    prompts = list(prompts)
    if not prompts:
      raise ValueError("prompts is empty; pass at least one prompt.")
    if cfg_scale is not None:
      cfg_scale = float(cfg_scale)
    sampling = SamplingParams(float(temperature), int(top_k), float(top_p),
                              cfg_scale).validate(self.model.image_vocab_size)
    batch_size = int(batch_size or self.eval_config["batch_size"])
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size}; expected > 0.")
    # Every batch has the same padded shape: one compile per SamplingParams.
    batch_size = min(batch_size, len(prompts))
    shards = self._batch_shards()
    batch_size = -(-batch_size // shards) * shards
    guided = sampling.cfg_scale is not None
    self.check_memory(batch_size, guided)
    text_ids = self.text_tokenizer.encode(
        prompts, self.model.text_length).ids  # [N, S]; ValueError if empty

    mesh, rules = self.mesh, self._rules()
    sharding = parallel.batch_sharding(mesh, rules)
    params = self._on_mesh(params)
    uncond = None
    if guided:
      uncond = jax.device_put(np.tile(self.unconditional_row(),
                                      (batch_size, 1)), sharding)
    fn = self._sample_fn(sampling)
    key = jax.random.PRNGKey(seed)
    n = len(prompts)
    out = np.zeros((n, self.model.image_length), np.int32)
    start, last_log = time.monotonic(), time.monotonic()
    for index, begin in enumerate(range(0, n, batch_size)):
      rows = text_ids[begin:begin + batch_size]
      count = len(rows)
      if count < batch_size:  # pad with copies of the first prompt
        rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - count,
                                               axis=0)])
      with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
        ids = fn(params, jax.device_put(rows, sharding),
                 jax.random.fold_in(key, index), uncond)
      out[begin:begin + count] = np.asarray(ids)[:count]
      now = time.monotonic()
      done = begin + count
      if now - last_log > 10 or (done == n and n > batch_size):
        last_log = now
        rate = done / max(now - start, 1e-9)
        logging.info("Sampled %d/%d images, %.2f images/s, ETA %.0fs.", done,
                     n, rate, (n - done) / rate)
    return out

  def sample(self, params, prompts: Sequence[str], *, seed: int = 0,
             cfg_scale: float | None = None, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0,
             batch_size: int | None = None) -> np.ndarray:
    """uint8 images [N, H, W, 3] for N prompts.

    Prompts are tokenized to config.model.text_length (an empty prompt is
    a ValueError naming its index; longer ones are truncated, counted and
    warned about by the text tokenizer). cfg_scale None samples without
    guidance; s >= 0 mixes u + s (c - u) (Parti §3). Deterministic per seed
    and batch_size (batch i draws with fold_in(PRNGKey(seed), i)). Bad
    sampling settings, or a batch that would not fit in memory, raise
    ValueError before anything is compiled.
    """
    ids = self.sample_ids(params, prompts, seed=seed, cfg_scale=cfg_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          batch_size=batch_size)
    tokenizer = self.image_tokenizer
    h, w = tokenizer.grid
    # Decode in padded chunks of one size: one compiled decoder.
    chunk = min(int(batch_size or self.eval_config["batch_size"]), 256)
    images = []
    for begin in range(0, len(ids), chunk):
      part = ids[begin:begin + chunk]
      padded = np.concatenate([part, np.zeros(
          (chunk - len(part), part.shape[1]), part.dtype)])
      images.append(tokenizer.decode(padded.reshape(-1, h, w))[:len(part)])
    return np.concatenate(images)

  # ------------------------------------------------------------------ eval

  def token_loss(self, params, batches, max_examples: int) -> dict:
    """Mean token cross-entropy/accuracy of full-text batches (no dropout)."""
    if self._loss_fn is None:
      def fn(params, text_ids, image_ids):
        logits = self.logits(params, text_ids, image_ids).astype(jnp.float32)
        ce = optax.softmax_cross_entropy_with_integer_labels(logits,
                                                             image_ids)
        correct = jnp.argmax(logits, -1) == image_ids
        return ce.mean(-1), correct.mean(-1)  # [B] per example
      self._loss_fn = jax.jit(fn)
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
      ce, acc = self._loss_fn(params, text_ids, image_ids)
      losses.append(np.asarray(ce)[:count])
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

  def _heldout_loss(self, params) -> dict:
    split = self.eval_config["loss_split"]
    if not split or not self.pretokenized_dir or not os.path.isfile(
        pretokenize.metadata_path(self.pretokenized_dir, split)):
      return {}
    batch_size = int(self.eval_config["batch_size"])
    data = self._dataset(split, batch_size, shuffle=False, seed=0,
                         num_epochs=1, drop_remainder=False)
    return self.token_loss(params, iter(data),
                           int(self.eval_config["num_loss_examples"]))

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """Probe prompt accuracy + Fréchet distance of samples; eval/ files.

    With config.eval.inception_weights / clip_dir set, also FID / CLIP score
    over config.eval.metrics_prompts (unimm.evaluation.generation_metrics).
    """
    del model_state
    from unimm.data import shapes  # pylint: disable=g-import-not-at-top
    from unimm.evaluation import generation_metrics  # pylint: disable=g-import-not-at-top
    from unimm.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
    cfg = self.eval_config
    start = time.time()
    metrics_on = generation_metrics.check_eval_config(cfg)  # before sampling
    seed_kw = {} if cfg["prompt_seed"] is None else {
        "seed": int(cfg["prompt_seed"])}
    prompt_set = probe_lib.fixed_prompt_set(
        int(cfg["num_single"]), int(cfg["num_pair"]), **seed_kw)
    captions = [caption for caption, _ in prompt_set]
    cfg_scale = cfg["cfg_scale"]
    cfg_scale = None if cfg_scale in (None, "") else float(cfg_scale)
    sample_kw = dict(cfg_scale=cfg_scale,
                     temperature=float(cfg["temperature"]),
                     top_k=int(cfg["top_k"]), top_p=float(cfg["top_p"]),
                     batch_size=int(cfg["batch_size"]))
    images = self.sample(params, captions, seed=int(cfg["seed"]), **sample_kw)
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
    result.update(self._heldout_loss(params))
    if metrics_on:  # FID / CLIP score; batch i samples with seed + 1 + i
      source = ""
      if self.pretokenized_dir and os.path.isfile(
          pretokenize.metadata_path(self.pretokenized_dir, "train")):
        source = pretokenize.load_metadata(self.pretokenized_dir).get(
            "source", "")
      result.update(generation_metrics.from_eval_config(
          cfg, lambda prompts, i: self.sample(
              params, prompts, seed=int(cfg["seed"]) + 1 + i, **sample_kw),
          workdir=workdir, image_size=image_size, default_source=source,
          data_dir=self.config.data.get("data_dir")))
    result.update(num_prompts=len(captions), steps=int(step),
                  cfg_scale=cfg_scale, eval_seconds=time.time() - start)
    result = {k: (v.item() if isinstance(v, np.generic) else v)
              for k, v in result.items()}
    if jax.process_index() == 0:
      out_dir = os.path.join(workdir, "eval")
      os.makedirs(out_dir, exist_ok=True)
      with open(os.path.join(out_dir, "report.json"), "w") as f:
        json.dump(result, f, indent=2)
      count = int(cfg["num_grid_samples"])
      # Half single-object, half two-object prompts in the grid.
      single = int(cfg["num_single"])
      picks = (list(range(min(count // 2, single))) +
               list(range(single, min(single + count - count // 2,
                                      len(captions)))))
      save_sample_grid(images[picks], [captions[i] for i in picks],
                       os.path.join(out_dir, "samples.png"))
    return {k: v for k, v in result.items() if v is not None}


def save_sample_grid(images, captions: Sequence[str], path: str,
                     columns: int = 8, cell: int = 128,
                     text_lines: int = 4) -> None:
  """PNG grid: each sample scaled to `cell` px high (nearest, keeping its
  aspect) with its prompt beneath."""
  from PIL import Image, ImageDraw, ImageFont  # pylint: disable=g-import-not-at-top,g-multiple-import
  font = ImageFont.load_default()
  line_height = 12
  pad = 4
  images = [np.asarray(image, np.uint8) for image in images]
  cell_w = max(cell * image.shape[1] // image.shape[0] for image in images)
  cell_h = cell + text_lines * line_height + 2 * pad
  n = len(images)
  columns = max(1, min(columns, n))
  rows = max(1, -(-n // columns))
  canvas = Image.new("RGB", (columns * (cell_w + pad) + pad,
                             rows * cell_h + pad), "white")
  draw = ImageDraw.Draw(canvas)
  for i, (image, caption) in enumerate(zip(images, captions)):
    x = pad + (i % columns) * (cell_w + pad)
    y = pad + (i // columns) * cell_h
    tile = Image.fromarray(image).resize(
        (cell * image.shape[1] // image.shape[0], cell), Image.NEAREST)
    canvas.paste(tile, (x, y))
    for j, line in enumerate(_wrap(draw, caption, font, cell_w)[:text_lines]):
      draw.text((x, y + cell + pad // 2 + j * line_height), line, fill="black",
                font=font)
  canvas.save(path)


def _wrap(draw, text: str, font, width: int) -> list[str]:
  lines, line = [], ""
  for word in text.split():
    candidate = f"{line} {word}".strip()
    if line and draw.textlength(candidate, font=font) > width:
      lines.append(line)
      line = word
    else:
      line = candidate
  if line:
    lines.append(line)
  return lines
