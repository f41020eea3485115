"""The diffusion de-tokenizer task: the frozen tokenizer's codes (or encoder
tokens) -> images, by flow matching (unimm.models.diffusion).

Images come from the image-text pipeline at the frozen tokenizer's
resolution (config.tokenizer_workdir; its parameters ride in model_state,
sharded and checkpointed with the rest, never trained). In the step the
tokenizer turns each image into its condition (config.condition: "codes",
the code vectors of its ids; "encoder", its encoder's tokens;
unimm.inference.detokenizer) and the decoder learns the velocity of the
noised image given it, the condition dropped (a learned null) at
config.loss.condition_drop_rate for classifier-free guidance.

The eval decodes held-out images both ways, by the tokenizer's own decoder
and by sampling the diffusion decoder (config.eval.num_steps, cfg_scale):
psnr (diffusion), tokenizer_psnr (the ViT-VQGAN decoder on the same ids)
and, with config.eval.probe_prompts > 0 (shapes world), the probe's reading
of both decoders' reconstructions of the fixed prompt set
(reconstructed_prompt_accuracy_single / _pair and tokenizer_...).

SEED-X's editing decoder (config.model.source_image, config arg source=1)
trains on the shapes world's edit pairs (unimm.data.interleaved.edit_pair):
the edited image's condition, and the image before the edit beside the
noisy image, dropped (no source) at config.loss.source_drop_rate so one
decoder also draws from the condition alone. Its eval decodes held-out
pairs: psnr (with the source), psnr_without_source, source_psnr (the
source itself against the edited image: what copying it scores) and the
probe's reading of the edited images, edit_accuracy(_without_source).
"""
import functools
import os
import time

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from unimm import config_lib
from unimm.data import interleaved as documents_lib
from unimm.data import pipeline
from unimm.evaluation import grids
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import reports
from unimm.inference import detokenizer as inference
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import diffusion
from unimm.tokenizers import losses as losses_lib

LOSS_DEFAULTS = dict(condition_drop_rate=0.1, source_drop_rate=0.2,
                     target="x")


class DetokenizerTask:
  """Task for unimm.train.trainer: the diffusion de-tokenizer."""

  def __init__(self, config: ml_collections.ConfigDict,
               tokenizer: tokenizer_lib.Tokenizer | None = None):
    """tokenizer: the frozen ViT-VQGAN; None loads config.tokenizer_workdir.
    One without params (the planner's, unimm.plan) has them traced with the
    init."""
    self.config = config
    config_lib.check_counts(config, "eval",
                            positive=("num_images", "batch_size",
                                      "num_steps"),
                            non_negative=("probe_prompts",))
    self.condition = inference.check_condition(
        config.get("condition", "codes"))
    self.loss_config = config_lib.with_defaults(LOSS_DEFAULTS, config, "loss")
    for name, use in (("condition_drop_rate", "0.1 trains guidance"),
                      ("source_drop_rate", "0.2 also trains decoding "
                       "without a source")):
      rate = self.loss_config[name]
      if not 0.0 <= rate < 1.0:
        raise ValueError(f"config.loss.{name}={rate}; expected a rate in "
                         f"[0, 1) ({use}).")
    # SEED-X's editing decoder: trained on edit pairs, the source image
    # beside the edited image's condition.
    self.source_image = bool(config.model.get("source_image", False))
    if self.loss_config["target"] not in diffusion.LOSS_TARGETS:
      raise ValueError(f"config.loss.target={self.loss_config['target']!r}; "
                       f"expected one of {diffusion.LOSS_TARGETS}.")
    if tokenizer is None:
      workdir = config.get("tokenizer_workdir") or ""
      if not workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to the "
                         "workdir of the trained ViT-VQGAN (config arg "
                         "tokenizer_workdir=...).")
      # Loaded now: init may run under jax.eval_shape / jit.
      tokenizer = tokenizer_lib.load_tokenizer(workdir)
    self.tokenizer = tokenizer
    self.model = inference.build_model(config, self.tokenizer)

  # ------------------------------------------------------------------ data

  def _dataset(self, split, batch_size, *, shuffle, num_epochs,
               process_index=0, process_count=1, drop_remainder=True):
    data = self.config.data
    return pipeline.image_text_dataset(
        data.source, split, batch_size=batch_size,
        image_size=self.tokenizer.image_size, shuffle=shuffle,
        seed=self.config.seed, num_epochs=num_epochs,
        process_index=process_index, process_count=process_count,
        data_dir=data.get("data_dir"),
        worker_count=data.get("worker_count", 0),
        drop_remainder=drop_remainder,
        then=functools.partial(documents_lib.edit_pair, seed=self.config.seed,
                               image_size=self.tokenizer.image_size)
        if self.source_image else None)

  def train_data(self, process_index: int, process_count: int):
    return self._dataset(
        "train", config_lib.per_host_batch_size(self.config, process_count),
        shuffle=True, num_epochs=None, process_index=process_index,
        process_count=process_count)

  # ------------------------------------------------------------------ model

  def init(self, rng, batch):
    s = self.tokenizer.image_size
    if tuple(batch["image"].shape[1:]) != (s, s, 3):
      raise ValueError(f"batch['image'] has shape {batch['image'].shape}; "
                       f"expected [B, {s}, {s}, 3], the tokenizer's size.")
    params = jax.jit(inference.params_init(self.model))(
        rng, {"image": batch["image"]})["params"]
    if self.tokenizer.params is None:  # planned: traced, never trained
      tokenizer_params = nn.unbox(self.tokenizer.model.init(
          rng, batch["image"])["params"])
    else:
      tokenizer_params = jax.tree.map(jnp.asarray,
                                      nn.unbox(self.tokenizer.params))
    return params, {"tokenizer": tokenizer_params}

  def loss(self, params, model_state, batch, rng):
    images = batch["image"]
    conditions = jax.lax.stop_gradient(inference.conditions_of_images(
        self.condition, self.tokenizer.model, model_state["tokenizer"],
        images))
    loss, metrics = diffusion.flow_matching_loss(
        self.model, params, images.astype(jnp.float32) / 255.0, conditions,
        rng, condition_drop_rate=self.loss_config["condition_drop_rate"],
        source01=(batch["source"].astype(jnp.float32) / 255.0
                  if self.source_image else None),
        source_drop_rate=self.loss_config["source_drop_rate"],
        target=self.loss_config["target"])
    return loss, (metrics, model_state)

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # ------------------------------------------------------------------ use

  def dependencies(self) -> dict[str, str]:
    """The frozen tokenizer's fingerprint (loading checks it)."""
    return {"tokenizer_workdir": tokenizer_lib.fingerprint(self.tokenizer)}

  def inference_model(self, params, step: int = 0) -> inference.Detokenizer:
    return inference.Detokenizer(self.model, nn.unbox(params), self.tokenizer,
                                 self.config, step)

  # ------------------------------------------------------------------ eval

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """PSNR of both decoders on held-out images (and the probe's reading
    of their reconstructions); writes eval/report.json and
    eval/reconstructions.png (rows: truth | ViT-VQGAN | diffusion; an
    editing decoder's start with the source)."""
    del model_state  # the frozen tokenizer's params: self.tokenizer's
    eval_cfg = self.config.get("eval", ml_collections.ConfigDict())
    num_images = int(eval_cfg.get("num_images", 256))
    batch_size = int(eval_cfg.get("batch_size", 64))
    split = eval_cfg.get("split", "test")
    probe_prompts = int(eval_cfg.get("probe_prompts", 0))
    detok = self.inference_model(params, step)
    start, seen = time.time(), 0
    psnr, tokenizer_psnr, shown = [], [], []
    edits = {"source": [], "without_source": [], "by_diffusion": [],
             "image": [], "caption": []}
    for batch in self._dataset(split, batch_size, shuffle=False,
                               num_epochs=1, drop_remainder=False):
      images = np.asarray(batch["image"])[:num_images - seen]
      ids = self.tokenizer.encode(images)
      by_tokenizer = np.asarray(self.tokenizer.decode(ids))
      # A codes-conditioned decoder reads the ids just encoded; an editing
      # decoder also the image the edit starts from.
      kw = dict(seed=seen, batch_size=batch_size)
      decode = (functools.partial(detok.decode, ids)
                if self.condition == "codes" else
                functools.partial(detok.reconstruct, images))
      if self.source_image:
        source = np.asarray(batch["source"])[:len(images)]
        by_diffusion = decode(source=source, **kw)
        edits["source"].append(source)
        edits["without_source"].append(decode(**kw))
        edits["by_diffusion"].append(by_diffusion)
        edits["image"].append(images)
        edits["caption"] += list(batch["caption"][:len(images)])
      else:
        by_diffusion = decode(**kw)
      psnr.append(losses_lib.psnr_uint8(by_diffusion, images))
      tokenizer_psnr.append(losses_lib.psnr_uint8(by_tokenizer, images))
      if not shown:
        shown = [images[:8], by_tokenizer[:8], by_diffusion[:8]]
        if self.source_image:
          shown.insert(0, source[:8])
      seen += len(images)
      logging.info("de-tokenizer eval: %d / %d images", seen, num_images)
      if seen >= num_images:
        break
    if not seen:
      raise ValueError(f"No images in split {split!r} (config.eval.split).")
    result = {
        "psnr": float(np.concatenate(psnr).mean()),
        "tokenizer_psnr": float(np.concatenate(tokenizer_psnr).mean()),
        "num_steps": int(detok.settings["num_steps"]),
        "cfg_scale": (1.0 if detok.settings["cfg_scale"] in (None, "")
                      else float(detok.settings["cfg_scale"])),
        "num_images": int(seen),
        "steps": int(step),
    }
    if self.source_image:
      # Edit pairs (interleaved.edit_pair): the edited image decoded with
      # its source and without, and the source itself (what copying it
      # scores).
      pairs = {k: np.concatenate(v) for k, v in edits.items()
               if k != "caption"}
      result["psnr_without_source"] = float(losses_lib.psnr_uint8(
          pairs["without_source"], pairs["image"]).mean())
      result["source_psnr"] = float(losses_lib.psnr_uint8(
          pairs["source"], pairs["image"]).mean())
      if probe_prompts > 0:
        for name, decoded in (("", pairs["by_diffusion"]),
                              ("_without_source", pairs["without_source"])):
          result[f"edit_accuracy{name}"] = probe_lib.prompt_accuracy(
              edits["caption"], decoded)["prompt_accuracy"]
    if probe_prompts > 0:
      size = self.tokenizer.image_size
      for name, reconstruct in (
          ("", lambda x: detok.reconstruct(x, batch_size=batch_size)),
          ("tokenizer_", lambda x: self.tokenizer.decode(
              self.tokenizer.encode(x)))):
        read = probe_lib.reconstruction_accuracy(
            reconstruct, probe_prompts, probe_prompts, size,
            batch_size=batch_size)
        for key in ("prompt_accuracy_single", "prompt_accuracy_pair"):
          result[f"{name}reconstructed_{key}"] = read[key]
    result["eval_seconds"] = float(time.time() - start)
    out_dir = os.path.join(workdir, "eval")
    result = reports.write_report(os.path.join(out_dir, "report.json"),
                                  {**result, "split": split,
                                   "condition": self.condition})
    if jax.process_index() == 0:
      s = self.tokenizer.image_size
      grids.save_image_grid(grids.side_by_side(*shown), None,
                            os.path.join(out_dir, "reconstructions.png"),
                            columns=4, cell=2 * s)
    return result
