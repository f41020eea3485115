"""The interleaved decoder-only task: next-token loss over packed documents.

Data: packed rows written by `python -m unimm.data.interleaved`
(config.data.packed_dir): tokens, segment_ids, positions, loss_mask [B, L].
The logits at t predict token t + 1 within the same document
(loss_mask[:, 1:] is 0 on padding and on each document's BOS, so nothing is
predicted across documents). Text and image targets are weighted by
config.loss.text_weight / image_weight (Chameleon and Gemini weigh them
alike; a lower image weight trades image quality for text), specials count
as text. Metrics report both losses and accuracies separately.

Classifier-free guidance (Ho & Salimans 2022, Parti §3): with
config.loss.drop_text_rate > 0, each document of a row loses all its text
tokens with that probability (drop_text below); what is left (BOS, images,
EOS) is exactly what the sampler's unconditional half sees, since PAD is
invisible and does not advance positions.

With config.model.image_output = "embeddings" (Emu; unimm.models.
interleaved) image targets carry no cross-entropy: the loss is the text
cross-entropy plus image_weight times the l2 error of each regressed next
embedding against the frozen tokenizer's vector of that code (the mean
square over the width, divided by the codes' mean variance per dimension,
so 1 is the error of always predicting the mean vector), weighed per token
like the codes' loss; with config.model.image_head = "gmm" the mixture's
negative log-likelihood per dimension replaces the l2 error (GIVT). With
image_output = "queries" (NExT-GPT / SEED-X) the same l2 error is the
projection of each written slot's query against that slot's own code
vector (the de-tokenizer's condition), and the cross-entropy of the token
before the span's first code is dropped alike. config.loss.diffusion_weight
> 0 adds CoDi-2's term: the frozen de-tokenizer's flow-matching loss on
each written image, conditioned on those projections and back-propagated
into the model (diffusion_loss).
"""
import os

from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm.data import interleaved as il_data
from unimm.data import pipeline
from unimm.evaluation import generation_metrics
from unimm.evaluation import grids
from unimm.evaluation import interleaved_eval
from unimm.evaluation import reports
from unimm.evaluation import retrieval
from unimm.inference import detokenizer as detokenizer_lib
from unimm.inference import interleaved as inference
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import diffusion
from unimm.models import image_input as image_input_lib
from unimm.models import interleaved as il
from unimm.models import vocab as vocab_lib
from unimm.sampling.sampler import SamplingParams
from unimm.tokenizers import text as text_lib

LOSS_DEFAULTS = dict(text_weight=1.0, image_weight=1.0, drop_text_rate=0.0,
                     diffusion_weight=0.0)


def drop_text(batch, rng, rate: float, is_text):
  """Drops every text token of a random `rate` of the documents in packed
  rows: they are removed and the row compacted (PAD at its end), positions
  and loss mask recomputed. is_text: joint ids [B, L] -> bool."""
  tokens, segment_ids = batch["tokens"], batch["segment_ids"]
  b, l = tokens.shape
  draw = jax.random.uniform(rng, (b, l))  # one per segment id (< l)
  dropped_doc = jnp.take_along_axis(draw, segment_ids, axis=1) < rate
  drop = dropped_doc & is_text(tokens) & (segment_ids > 0)
  order = jnp.argsort(drop, axis=1, stable=True)  # kept tokens first
  gone = jnp.take_along_axis(drop, order, axis=1)
  tokens = jnp.where(gone, il.PAD_ID, jnp.take_along_axis(tokens, order, 1))
  segment_ids = jnp.where(gone, 0,
                          jnp.take_along_axis(segment_ids, order, 1))
  return dict(batch, tokens=tokens, segment_ids=segment_ids,
              **il_data.packed_features(segment_ids, xp=jnp))


class InterleavedTask:
  """Task for unimm.train.trainer: the decoder-only interleaved model."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    config_lib.check_counts(
        config, "eval", positive=("batch_size", "num_batches",
                                  "generation_batch_size", "caption_beams"),
        non_negative=("num_generation", "num_questions", "num_referring",
                      "num_grounded", "num_drawn",
                      "retrieval_pairs", "num_grid_samples"))
    self.model = config_lib.build_module(il.InterleavedLM, config.model)
    self.image_input = image_input_lib.ImageInput.of(self.model)
    self.layout = vocab_lib.VocabLayout(
        text_vocab_size=int(config.vocab.text_vocab_size),
        image_vocab_size=int(config.vocab.image_vocab_size),
        read_ids=self.image_input.reads_images,
        location_bins=int(config.vocab.get("location_bins", 0)))
    if self.layout.size != self.model.vocab_size:
      raise ValueError(
          f"config.model.vocab_size={self.model.vocab_size} but the layout "
          f"(config.vocab, image_input={self.image_input.kind!r}) has "
          f"{self.layout.size} ids; set vocab_size = 5 + text_vocab_size + "
          "image_vocab_size (+ 2 READ / NEWLINE ids when images are read, "
          "+ location_bins**2 location ids).")
    grounded_evals = {
        name: int((config.get("eval") or {}).get(name, 0))
        for name in ("num_referring", "num_grounded", "num_drawn")}
    if not self.layout.location_bins and any(grounded_evals.values()):
      raise ValueError(
          f"config.eval asks for grounding ({grounded_evals}) but the model "
          "has no location ids (config.vocab.location_bins=0); set config "
          "arg bins=16 and pack the rows with --kinds holding refer, "
          "grounded_caption or draw_box, or set those counts to 0.")
    if self.image_input.reads_images and (
        self.model.read_id, self.model.newline_id) != (
            self.layout.read_id, self.layout.newline_id):
      raise ValueError(
          f"config.model.read_id / newline_id = {self.model.read_id} / "
          f"{self.model.newline_id}; the layout's are {self.layout.read_id} "
          f"/ {self.layout.newline_id} (set them from VocabLayout).")
    # The resampler reads the frozen tokenizer's encoder (loaded here, out
    # of any trace; its params travel in the model state).
    self.reader_tokenizer = (
        tokenizer_lib.load_tokenizer(config.tokenizer_workdir)
        if self.image_input.kind == "resampler" else None)
    self.output_tokenizer, self.detokenizer = None, None
    if self.model.image_output != "codes":
      self._check_embeddings_output(config)
    self.loss_config = config_lib.with_defaults(LOSS_DEFAULTS, config, "loss")
    weight = self.loss_config["diffusion_weight"]
    if weight and (self.model.image_output != "queries"
                   or self.detokenizer is None):
      raise ValueError(
          f"config.loss.diffusion_weight={weight} back-propagates the "
          "de-tokenizer's diffusion loss into output queries (CoDi-2): it "
          "needs config.model.image_output='queries' (config arg "
          "output=queries) and config.detokenizer_workdir; got image_output="
          f"{self.model.image_output!r}, detokenizer_workdir="
          f"{config.get('detokenizer_workdir')!r}.")
    # FID / CLIP score of held-out captions' samples (own data; off if the
    # settings are empty), checked before training.
    eval_section = config.get("eval") or {}
    self.metrics_config = {
        k: eval_section.get(k, v)
        for k, v in generation_metrics.CONFIG_DEFAULTS.items()}
    generation_metrics.check_eval_config(self.metrics_config)
    # The eval continues held-out edit documents (a source image and its
    # instruction) by one more image: about 3 images' worth of context.
    eval_cfg = config.get("eval", {})
    need = 3 * self.model.image_length + 40
    if eval_cfg.get("num_generation", 0) and self.model.max_len < need:
      raise ValueError(
          f"config.model.max_len={self.model.max_len} leaves the eval no "
          f"room to generate: its edit documents need about {need} tokens "
          f"({self.model.image_length} per image). Raise max_len (config "
          "arg length=...) or set config.eval.num_generation=0.")

  def _check_embeddings_output(self, config) -> None:
    """Loads the tokenizer whose code vectors the model regresses (and the
    de-tokenizer, if named) and checks their shapes before training."""
    if self.model.image_output == "queries" and (
        not self.image_input.reads_images):
      raise ValueError(
          "config.model.image_output='queries' writes every code span from "
          "learned queries, so given images must be read another way; set "
          "config arg image_input=patches or resampler (and pack the rows "
          "with the same --image_input).")
    self.output_tokenizer = (self.reader_tokenizer or  # the same one
                             tokenizer_lib.load_tokenizer(
                                 config.tokenizer_workdir))
    # Computed here, out of any trace (init runs under jit / eval_shape).
    self.code_table = self.output_tokenizer.code_table()
    tok = self.output_tokenizer.model
    if (self.model.embedding_dim, self.model.image_codes) != (
        tok.decoder_embed_dim, tok.num_codes):
      raise ValueError(
          f"config.model.embedding_dim / image_codes = "
          f"{self.model.embedding_dim} / {self.model.image_codes}, but the "
          f"tokenizer in {config.tokenizer_workdir!r} has code vectors of "
          f"width {tok.decoder_embed_dim} and {tok.num_codes} codes; set "
          "config args embedding_dim=... and codes=... to match.")
    rerank = (config.get("eval") or {}).get("caption_rerank", 0.0)
    if rerank:
      raise ValueError(
          f"config.eval.caption_rerank={rerank} reranks captions by the "
          f"image codes' likelihood, which image_output="
          f"{self.model.image_output!r} does not model; set config arg "
          "rerank=0.")
    if config.get("detokenizer_workdir"):
      self.detokenizer = detokenizer_lib.load_detokenizer(
          config.detokenizer_workdir)
      inference.check_detokenizer(self.model, self.detokenizer)

  # ------------------------------------------------------------------ data

  @property
  def packed_dir(self) -> str:
    return self.config.data.get("packed_dir", "") or ""

  def _check_metadata(self, split: str) -> None:
    metadata = il_data.load_metadata(self.packed_dir, split)
    packed = il_data.image_input_of(metadata)
    mine = self.image_input
    if packed.kind != mine.kind or (mine.reads_images and (
        packed.patch_size, packed.num_queries) != (mine.patch_size,
                                                   mine.num_queries)):
      raise ValueError(
          f"Packed data in {self.packed_dir!r} was written for {packed} but "
          f"the model reads images as {mine} (config.model.image_input, "
          "patch_size, num_queries); re-pack with "
          "`python -m unimm.tools.pack_interleaved --image_input ...` or "
          "point config.data.packed_dir at rows packed for this setting.")
    if metadata.get("end_of_image") and not self.model.end_of_image:
      raise ValueError(
          f"Packed data in {self.packed_dir!r} holds variable-length image "
          "spans (a LaVIT tokenizer's kept codes, each span ended by EOI) "
          "but config.model.end_of_image is False; train with "
          "configs/interleaved_shapes.py:dynamic=1, or pack with a grid or "
          "SEED tokenizer.")
    layout = metadata["layout"]
    packed_bins = int(layout.get("location_bins", 0))
    if packed_bins != self.layout.location_bins:
      raise ValueError(
          f"Packed data in {self.packed_dir!r} has "
          + (f"boxes on a {packed_bins}x{packed_bins} location grid"
             if packed_bins else "no location ids")
          + " but config.vocab.location_bins="
          f"{self.layout.location_bins}; set config arg bins={packed_bins}"
          + (f" or re-pack with --location_bins "
             f"{self.layout.location_bins}." if self.layout.location_bins
             and packed_bins else "."))
    size = layout.get("size", 5 + layout["text_vocab_size"]
                      + layout["image_vocab_size"])
    if size != self.model.vocab_size:
      raise ValueError(
          f"Packed data in {self.packed_dir!r} uses a joint vocabulary of "
          f"{size} ids (text {layout['text_vocab_size']} + image "
          f"{layout['image_vocab_size']} + specials) but "
          f"config.model.vocab_size={self.model.vocab_size}; make them match "
          "(config args text_vocab=..., codes=...).")
    if metadata["length"] > self.model.max_len:
      raise ValueError(
          f"Packed rows are {metadata['length']} tokens long but "
          f"config.model.max_len={self.model.max_len}; raise max_len or "
          "re-pack with --length.")

  def _dataset(self, split, batch_size, *, shuffle, num_epochs,
               process_index=0, process_count=1, drop_remainder=True):
    if not self.packed_dir:
      raise ValueError("config.data.packed_dir is empty; write packed "
                       "documents with `python -m unimm.data.interleaved`.")
    self._check_metadata(split)
    return il_data.packed_dataset(
        self.packed_dir, split, batch_size=batch_size, shuffle=shuffle,
        seed=self.config.seed, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        drop_remainder=drop_remainder)

  def train_data(self, process_index: int, process_count: int):
    batch_size = config_lib.per_host_batch_size(self.config, process_count)
    return self._dataset("train", batch_size, shuffle=True,
                         num_epochs=None, process_index=process_index,
                         process_count=process_count)

  # ------------------------------------------------------------------ model

  def init(self, rng, batch):
    tokens = jnp.asarray(batch["tokens"])
    model_state = {}
    if self.image_input.kind == "resampler":
      # The frozen encoder the resampler reads travels in the state, not in
      # the compiled step (unimm.inference.tokenizer.reader_features).
      model_state = {"image_encoder": jax.tree.map(
          jnp.asarray, nn.unbox(self.reader_tokenizer.params))}
    if self.loss_config["diffusion_weight"]:
      # CoDi-2: the frozen de-tokenizer, and the tokenizer whose decoder
      # draws the written images' targets, travel in the state too.
      model_state = dict(model_state, **jax.tree.map(jnp.asarray, dict(
          detokenizer=nn.unbox(self.detokenizer.params),
          tokenizer=nn.unbox(self.output_tokenizer.params))))
    reads = self.reads(model_state, batch)
    params = jax.jit(lambda r, t, x: self.model.init(r, t, reads=x))(
        rng, tokens, reads)["params"]
    if self.output_tokenizer is not None:
      # The code vectors the model regresses: a frozen copy in its params,
      # so a checkpoint samples without the tokenizer's.
      leaf = params["frozen_image_table"]
      table = jnp.asarray(self.code_table, nn.unbox(leaf).dtype)
      params = dict(params, frozen_image_table=(
          leaf.replace_boxed(table) if isinstance(leaf, nn.Partitioned)
          else table))
    return params, model_state


  def reads(self, model_state, batch):
    """What the READ slots of a batch read: None ("codes"), the pixel
    patches ("patches"), or the frozen encoder's tokens ("resampler")."""
    if not self.image_input.reads_images:
      return None
    reads = jnp.asarray(batch["reads"])
    if self.image_input.kind == "resampler":
      return tokenizer_lib.reader_features(
          self.reader_tokenizer.model, model_state["image_encoder"], reads,
          self.image_input.patch_size)
    return reads

  def image_target_mask(self, targets):
    """bool: which joint ids are image codes (the rest count as text)."""
    return self.layout.is_image(targets)

  def is_text(self, ids):
    """bool: which joint ids are text pieces (not specials, not codes)."""
    return self.layout.is_text(ids)

  def loss(self, params, model_state, batch, rng):
    cfg = self.loss_config
    if cfg["drop_text_rate"] > 0 and rng is not None:
      batch = drop_text(batch, rng, cfg["drop_text_rate"], self.is_text)
    tokens = batch["tokens"]  # [B, L]
    regressing = self.model.image_output != "codes"
    out = self.model.apply({"params": params}, tokens,
                           batch["segment_ids"], batch["positions"],
                           reads=self.reads(model_state, batch),
                           regress=regressing)
    logits, predicted = out if regressing else (out, None)
    logits = logits[:, :-1].astype(jnp.float32)  # [B, L-1, V]
    targets = tokens[:, 1:]
    # READ / NEWLINE slots are given, never predicted.
    mask = (batch["loss_mask"][:, 1:]
            * ~self.layout.is_read(targets)).astype(jnp.float32)
    nll = -il.token_logprobs(logits, targets)  # [B, L-1]
    correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
    is_image = self.image_target_mask(targets).astype(jnp.float32)
    image_mask, text_mask = mask * is_image, mask * (1.0 - is_image)
    weights = (cfg["text_weight"] * text_mask +
               cfg["image_weight"] * image_mask)
    if regressing:
      # Emu: the l2 error of the regressed next embedding replaces the
      # image codes' cross-entropy (and their accuracy is the nearest
      # table row's).
      target = self.model.apply({"params": params}, targets,
                                method=il.InterleavedLM.code_embeddings)
      # "embeddings": slot t regresses slot t + 1's vector; "queries": its
      # own (the projection of a written slot is that slot's condition).
      raw = (predicted[:, 1:] if self.model.image_output == "queries"
             else predicted[:, :-1])
      if self.model.image_head == "gmm":
        error = il.mixture_nll(raw, target, self.model.mixtures)
        raw = il.mixture_mode(raw, self.model.mixtures)
      else:
        # In units of the codes' variance: 1 = predicting the mean vector.
        table = params["frozen_image_table"]
        spread = jnp.mean(jnp.var(jax.lax.stop_gradient(table), axis=0))
        error = jnp.mean(jnp.square(raw - target), axis=-1) / spread
      nll = jnp.where(image_mask > 0, error, nll)
      nearest = self.model.apply({"params": params}, raw,
                                 method=il.InterleavedLM.nearest_codes)
      correct = jnp.where(image_mask > 0,
                          (nearest == targets).astype(jnp.float32), correct)
    loss = jnp.sum(nll * weights) / jnp.maximum(jnp.sum(weights), 1.0)

    def mean(x, m):
      return jnp.sum(x * m) / jnp.maximum(jnp.sum(m), 1.0)

    metrics = {
        "text_loss": mean(nll, text_mask),
        "image_loss": mean(nll, image_mask),
        "text_accuracy": mean(correct, text_mask),
        "image_accuracy": mean(correct, image_mask),
        "tokens_per_row": jnp.sum(mask) / tokens.shape[0],
    }
    if cfg["diffusion_weight"]:
      flow = self.diffusion_loss(
          predicted, batch, model_state,
          jax.random.fold_in(jax.random.PRNGKey(0) if rng is None else rng,
                             1))
      loss = loss + cfg["diffusion_weight"] * flow
      metrics["diffusion_loss"] = flow
    return loss, (metrics, model_state)

  def diffusion_loss(self, projected, batch, model_state, rng):
    """CoDi-2's term: the frozen de-tokenizer's flow-matching loss on each
    written image of the batch (its codes drawn by the tokenizer's
    decoder), conditioned on the output queries' projections
    (projected [B, L, E]), so its gradient reaches the model."""
    tokens = batch["tokens"]
    b, length = tokens.shape
    k = self.model.image_length
    is_code = self.layout.is_image(tokens)
    starts = is_code & ~jnp.pad(is_code, ((0, 0), (1, 0)))[:, :-1] & (
        batch["loss_mask"] > 0)
    most = b * (length // (k + 2))  # a static bound on spans per batch
    first = jnp.nonzero(starts.reshape(-1), size=most, fill_value=0)[0]
    slots = jnp.minimum(first[:, None] + jnp.arange(k), b * length - 1)
    conditions = projected.reshape(b * length, -1)[slots]  # [M, K, E]
    codes = jnp.clip(tokens.reshape(-1)[slots] - self.layout.image_offset,
                     0, self.model.image_codes - 1)
    tokenizer = self.output_tokenizer.model
    images = jax.lax.stop_gradient(tokenizer.apply(
        {"params": model_state["tokenizer"]},
        codes.reshape(most, *tokenizer.grid), method=type(tokenizer).decode))
    weights = (jnp.arange(most) < jnp.sum(starts)).astype(jnp.float32)
    detok = self.detokenizer
    loss, _ = diffusion.flow_matching_loss(
        detok.model, jax.lax.stop_gradient(model_state["detokenizer"]),
        images, conditions, rng,
        target=(detok.config.get("loss") or {}).get("target", "x"),
        weights=weights)
    return loss

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # ------------------------------------------------------------------ eval

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """Held-out losses on config.eval.split (packed rows), then on shapes
    documents with config.eval.num_generation > 0, prompt / caption / edit
    accuracy of generated documents (unimm.evaluation.interleaved_eval;
    images guided by config.eval.cfg_scale; "", None or 1 for none), or on
    a converted data set's pairs, retrieval and held-out grids
    (_heldout_eval)."""
    eval_cfg = self.config.get("eval", ml_collections.ConfigDict())
    split = eval_cfg.get("split", "validation")
    batch_size = int(eval_cfg.get("batch_size", self.config.data.batch_size))
    max_batches = int(eval_cfg.get("num_batches", 8))
    fn = jax.jit(lambda p, b: self.loss(p, model_state, b, None))
    totals, count = {}, 0
    for i, batch in enumerate(self._dataset(split, batch_size, shuffle=False,
                                            num_epochs=1,
                                            drop_remainder=False)):
      if i >= max_batches:
        break
      loss, (metrics, _) = fn(nn.unbox(params),
                              {k: jnp.asarray(v) for k, v in batch.items()})
      for key, value in dict(metrics, loss=loss).items():
        totals[key] = totals.get(key, 0.0) + float(value)
      count += 1
    if not count:
      raise ValueError(f"No packed rows in split {split!r} of "
                       f"{self.packed_dir!r} (config.eval.split).")
    result = {f"eval_{k}": v / count for k, v in totals.items()}
    result.update(steps=int(step))
    out_dir = os.path.join(workdir, "eval")
    metadata = il_data.load_metadata(self.packed_dir, split)
    if metadata.get("source", "shapes") != "shapes":
      # Pairs of a converted data set: no shapes probe applies.
      result.update(self._heldout_eval(params, step, metadata, out_dir))
    elif int(eval_cfg.get("num_generation", 0)) > 0:
      # Generation read back by the shapes probe, with the settings
      # load_model's methods default to (config.eval).
      n = int(eval_cfg["num_generation"])
      model = self.inference_model(params, step)
      settings = model.settings
      cfg_scale = SamplingParams.from_config(
          settings, self.layout.size).cfg_scale
      if cfg_scale == 1.0:  # exactly unguided sampling (tested), half the cost
        cfg_scale = None
      result.update(interleaved_eval.evaluate_generation(
          model, out_dir, num_prompts=n, num_captions=n, num_edits=n,
          temperature=float(settings["temperature"]),
          batch_size=int(eval_cfg.get("generation_batch_size", 32)),
          cfg_scale=cfg_scale,
          image_temperature=settings["image_temperature"],
          caption_beams=int(settings["caption_beams"]),
          caption_rerank=float(settings["caption_rerank"]),
          num_questions=int(eval_cfg.get("num_questions", 0)),
          num_referring=int(eval_cfg.get("num_referring", 0)),
          num_grounded=int(eval_cfg.get("num_grounded", 0)),
          num_drawn=int(eval_cfg.get("num_drawn", 0))))
      result["cfg_scale"] = 1.0 if cfg_scale is None else cfg_scale
    return reports.write_report(os.path.join(out_dir, "report.json"), result)

  def _heldout_eval(self, params, step: int, metadata: dict,
                    out_dir: str) -> dict:
    """The eval on a converted data set's held-out pairs (the eval split's
    source and read_split, first caption of each): caption retrieval both
    ways over the first config.eval.retrieval_pairs pairs (retrieval_r1 /
    _r5 ranking captions by log p(image | caption), retrieval_caption_r1 /
    _r5 by log p(caption | image), chance beside them), and for the first
    config.eval.num_grid_samples pairs eval/heldout_samples.png (each true
    image beside a sample for its caption) and eval/heldout_captions.tsv
    (true caption, the model's caption of the image)."""
    eval_cfg = self.config.eval
    num_pairs = int(eval_cfg.get("retrieval_pairs", 32))
    num_grid = int(eval_cfg.get("num_grid_samples", 8))
    images, captions = self.heldout_pairs(metadata, max(num_pairs, num_grid))
    model = self.inference_model(params, step)
    result = {}
    if num_pairs >= 2 and len(captions) >= 2:
      scores = model.retrieval_scores(
          images[:num_pairs], captions[:num_pairs],
          batch_size=int(eval_cfg.get("batch_size", 32)))
      pairs = captions[:num_pairs]
      result.update(retrieval.recall_at_k(scores["image_given_caption"],
                                          captions=pairs))
      result.update({
          k.replace("retrieval_", "retrieval_caption_"): v
          for k, v in retrieval.recall_at_k(
              scores["caption_given_image"], captions=pairs).items()
          if k.startswith("retrieval_r")})
    if num_grid > 0:
      images, captions = images[:num_grid], captions[:num_grid]
      seed = int(eval_cfg.get("seed", 0))
      samples = model.sample(captions, seed=seed)
      written = model.caption(  # as long as the training captions
          images, seed=seed,
          max_new_tokens=int(metadata.get("max_text_tokens", 47)) + 1)
      if jax.process_index() == 0:
        epath.Path(out_dir).mkdir(parents=True, exist_ok=True)
        grids.save_image_grid(grids.side_by_side(images, samples), captions,
                              os.path.join(out_dir, "heldout_samples.png"),
                              columns=4)
        epath.Path(out_dir, "heldout_captions.tsv").write_text(
            "caption\tgenerated\n" + "".join(
                f"{' '.join(c.split())}\t{' '.join(g.split())}\n"
                for c, g in zip(captions, written)))
      result["heldout_grid_samples"] = len(captions)
    if generation_metrics.check_eval_config(self.metrics_config):
      # FID / CLIP score; batch i samples with seed + 1 + i. Prompts default
      # to the held-out pairs' captions (config.eval.metrics_prompts).
      seed = int(eval_cfg.get("seed", 0))
      metrics_config = dict(self.metrics_config)
      metrics_config.setdefault("batch_size", int(eval_cfg.get(
          "batch_size", 32)))
      if not metrics_config["metrics_prompts"]:
        metrics_config["metrics_prompts"] = (
            f"{metadata['source']}:{metadata['read_split']}")
      result.update(generation_metrics.from_eval_config(
          metrics_config, lambda prompts, i: model.sample(
              prompts, seed=seed + 1 + i),
          workdir=os.path.dirname(out_dir),
          image_size=int(metadata["image_size"])))
    return result

  def heldout_pairs(self, metadata: dict, count: int
                    ) -> tuple[np.ndarray, list[str]]:
    """(uint8 images [n, S, S, 3], first captions [n]): the first `count`
    pairs of the converted data set a split of pairs was packed from."""
    source, split = metadata["source"], metadata["read_split"]
    size = int(metadata["image_size"])
    dataset = pipeline.image_text_dataset(
        source, split, batch_size=max(1, count), image_size=size,
        shuffle=False, seed=0, num_epochs=1, drop_remainder=False)
    batch = next(iter(dataset))
    return (np.asarray(batch["image"][:count], np.uint8),
            [str(c) for c in batch["caption"][:count]])

  def dependencies(self) -> dict[str, str]:
    """Fingerprints of the frozen tokenizers (saved with the checkpoints;
    loading the model checks them); only those the config names."""
    found = {}
    if self.config.get("tokenizer_workdir"):
      found["tokenizer_workdir"] = tokenizer_lib.fingerprint(
          tokenizer_lib.load_tokenizer(self.config.tokenizer_workdir))
    if self.config.get("text_tokenizer"):
      found["text_tokenizer"] = checkpoints.text_fingerprint(
          text_lib.TextTokenizer.load(self.config.text_tokenizer).model_proto)
    return found

  def inference_model(self, params, step: int = 0
                      ) -> inference.InterleavedModel:
    """The inference model over `params` with config's tokenizers (what
    load_model gives for a checkpoint of them)."""
    return inference.InterleavedModel(
        self.model, self.layout, params,
        tokenizer_lib.load_tokenizer(self.config.tokenizer_workdir),
        text_lib.TextTokenizer.load(self.config.text_tokenizer),
        self.config, int(step), detokenizer=self.detokenizer)
