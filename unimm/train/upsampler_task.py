"""The super-resolution task: base-resolution tokens -> 2x / 4x images.

Training pairs come from the image-text pipeline at the frozen tokenizer's
resolution: for the shapes world each example's scene is rendered again at
factor x that size, so (base, high) pairs are exact; for converted data the
high-resolution image is the stored one resized to factor x base, and the
base image its box-filtered downsampling. In the step, the frozen tokenizer
(config.tokenizer_workdir; its parameters ride in model_state, so they are
sharded and checkpointed like the rest and never receive gradients)
encodes the base image and decodes the ids, and the upsampler learns to map
(decoded image, code vectors) to the high-resolution image: exactly what it
gets at sampling time from Parti's ids.

Loss (the tokenizer's family, ViT-VQGAN §3.3): l2_weight * l2 +
logit_laplace_weight * logit-Laplace NLL (model.predict_scale) +
perceptual_weight * LPIPS (local weights). There is no adversarial term: the
PSNR target does not call for it, and at these sizes a GAN only costs time.
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
from PIL import Image

from unimm import config_lib
from unimm.data import convert
from unimm.data import pipeline
from unimm.data import shapes
from unimm.evaluation import grids
from unimm.evaluation import reports
from unimm.inference import tokenizer as tokenizer_lib
from unimm.inference import upsampler as inference
from unimm.tokenizers import losses as losses_lib
from unimm.tokenizers import upsampler as upsampler_lib
from unimm.tokenizers import vit_vqgan

LOSS_DEFAULTS = dict(
    l2_weight=1.0,
    logit_laplace_weight=0.0,
    perceptual_weight=0.0,
    perceptual_weights="",  # path to an LPIPS-VGG16 .npz (losses.py)
)


to_uint8 = inference.to_uint8


def make_pair(example, *, base_size: int, factor: int) -> dict:
  """TFDS example -> {"image": uint8 [s, s, 3], "target": [s*f, s*f, 3]}."""
  high_size = base_size * factor
  if "scene" in example:
    parsed = pipeline.parse_image_text(example, image_size=base_size)
    scene = shapes.scene_from_json(parsed["scene"])
    return {"image": parsed["image"], "target": shapes.render(scene, high_size)}
  image = convert.to_rgb(Image.fromarray(
      np.asarray(example["image"], np.uint8).squeeze()))
  target = convert.resize_and_center_crop(image, high_size)
  base = target.resize((base_size, base_size), Image.BOX)
  return {"image": np.asarray(base), "target": np.asarray(target)}


class UpsamplerTask:
  """Task for unimm.train.trainer: the super-resolution module."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    config_lib.check_counts(config, "eval",
                            positive=("num_images", "batch_size"))
    self.model = config_lib.build_module(upsampler_lib.Upsampler, config.model)
    upsampler_lib.check_factor(self.model.factor)
    self.loss_config = config_lib.with_defaults(LOSS_DEFAULTS, config, "loss")
    if self.loss_config["logit_laplace_weight"] > 0 and (
        not self.model.predict_scale):
      raise ValueError(
          "config.loss.logit_laplace_weight > 0 needs the scale output: set "
          "config.model.predict_scale=True.")
    self.perceptual_fn = None
    if self.loss_config["perceptual_weight"] > 0:
      path = self.loss_config["perceptual_weights"]
      if not path or not os.path.exists(path):
        raise ValueError(
            "config.loss.perceptual_weight > 0 needs LPIPS-VGG16 weights at "
            f"config.loss.perceptual_weights, got {path!r}; see "
            "losses.load_lpips_npz, or set the weight to 0.")
      self.perceptual_fn = losses_lib.make_perceptual_loss(path)
    self._tokenizer = None
    self._fns = {}
    # Loaded now, not lazily: init may run under jax.eval_shape / jit, where
    # a checkpoint cannot be restored.
    if not self.tokenizer.model.codes_on_grid and self.model.use_codes:
      kind = (f"SEED's {self.tokenizer.model.num_queries} 1-D tokens"
              if self.tokenizer.model.num_queries else
              "LaVIT's dynamic tokens")
      raise ValueError(
          f"The tokenizer in {self.tokenizer.path!r} writes {kind}, which "
          "have no place in the image for the upsampler's code features; train it "
          "on the decoded images alone (config arg codes=0, "
          "config.model.use_codes=False).")

  @property
  def factor(self) -> int:
    return self.model.factor

  @property
  def tokenizer(self):
    """The frozen ViT-VQGAN of config.tokenizer_workdir."""
    if self._tokenizer is None:
      workdir = self.config.get("tokenizer_workdir") or ""
      if not workdir:
        raise ValueError("config.tokenizer_workdir is empty; set it to the "
                         "workdir of the trained ViT-VQGAN (config arg "
                         "tokenizer_workdir=...).")
      self._tokenizer = tokenizer_lib.load_tokenizer(workdir)
    return self._tokenizer

  @property
  def base_size(self) -> int:
    return self.tokenizer.image_size

  @property
  def high_size(self) -> int:
    return self.base_size * self.factor

  # ------------------------------------------------------------------ data

  def _dataset(self, split, batch_size, *, shuffle, num_epochs,
               process_index=0, process_count=1, drop_remainder=True):
    data = self.config.data
    source, _ = pipeline.image_text_source(
        data.source, split, image_size=self.base_size,
        data_dir=data.get("data_dir"))
    return pipeline.batched_dataset(
        source, batch_size=batch_size, shuffle=shuffle, seed=self.config.seed,
        num_epochs=num_epochs, process_index=process_index,
        process_count=process_count,
        transform=functools.partial(make_pair, base_size=self.base_size,
                                    factor=self.factor),
        drop_remainder=drop_remainder,
        worker_count=data.get("worker_count", 0))

  def train_data(self, process_index: int, process_count: int):
    batch_size = config_lib.per_host_batch_size(self.config, process_count)
    return self._dataset("train", batch_size, shuffle=True,
                         num_epochs=None, process_index=process_index,
                         process_count=process_count)

  # ------------------------------------------------------------------ model

  def _check_images(self, images, what="images"):
    s = self.base_size
    if tuple(images.shape[1:]) != (s, s, 3):
      raise ValueError(
          f"The upsampler takes {what} at the tokenizer's base resolution "
          f"[N, {s}, {s}, 3], got {tuple(images.shape)}; resize them to "
          f"{s}x{s} first (the tokenizer in config.tokenizer_workdir is "
          f"trained at {s}).")

  def _encode(self, tokenizer_params, images):
    return self.tokenizer.model.apply({"params": tokenizer_params}, images,
                                      method=vit_vqgan.ViTVQGAN.encode)

  def init(self, rng, batch):
    images = jnp.asarray(batch["image"])
    self._check_images(images)
    b = images.shape[0]
    gh, gw = self.tokenizer.grid
    d = self.tokenizer.model.decoder_embed_dim
    params = jax.jit(self.model.init)(
        rng, jnp.zeros(images.shape, jnp.float32),
        jnp.zeros((b, gh, gw, d), jnp.float32))["params"]
    tokenizer_params = jax.tree.map(jnp.asarray, nn.unbox(self.tokenizer.params))
    return params, {"tokenizer": tokenizer_params}

  def _upsample(self, params, tokenizer_params, ids):
    return inference.upsample(self.model, self.tokenizer.model,
                              nn.unbox(params), tokenizer_params, ids)

  def loss(self, params, model_state, batch, rng):
    del rng
    cfg = self.loss_config
    tokenizer_params = model_state["tokenizer"]
    ids = self._encode(tokenizer_params, batch["image"])
    decoded, mu, log_scale = self._upsample(params, tokenizer_params, ids)
    target = batch["target"].astype(jnp.float32) / 255.0  # [B, H, W, 3]
    l2 = losses_lib.l2_loss(mu, target)
    total = cfg["l2_weight"] * l2
    metrics = {"l2": l2}
    if log_scale is not None:
      # mu is in pixel units; the logit-Laplace location is its logit.
      x = losses_lib.map_pixels(jnp.clip(mu, 0.0, 1.0))
      nll = losses_lib.logit_laplace_nll(jnp.log(x) - jnp.log1p(-x),
                                         log_scale, target)
      total += cfg["logit_laplace_weight"] * nll
      metrics["logit_laplace"] = nll
    if self.perceptual_fn is not None:
      perceptual = self.perceptual_fn(jnp.clip(mu, 0.0, 1.0), target)
      total += cfg["perceptual_weight"] * perceptual
      metrics["perceptual"] = perceptual
    bicubic = upsampler_lib.bicubic(decoded, self.factor)
    metrics["psnr_gain_db"] = 10 * (
        jnp.log10(losses_lib.l2_loss(jnp.clip(bicubic, 0, 1), target)) -
        jnp.log10(l2))
    return total, (metrics, model_state)

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # ------------------------------------------------------------------ use

  def dependencies(self) -> dict[str, str]:
    """The frozen tokenizer's fingerprint (saved with the checkpoints;
    loading the upsampler checks it)."""
    return {"tokenizer_workdir": tokenizer_lib.fingerprint(self.tokenizer)}

  def inference_model(self, params) -> inference.Upsampler:
    """The inference upsampler over `params` (what load_upsampler gives for
    a checkpoint of them)."""
    return inference.Upsampler(self.model, nn.unbox(params), self.tokenizer,
                               self.config)

  # ------------------------------------------------------------------ eval

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """PSNR of the upsampler and of bicubic upsampling of the same decoded
    image against the true high-resolution render of held-out scenes."""
    eval_cfg = self.config.get("eval", ml_collections.ConfigDict())
    num_images = int(eval_cfg.get("num_images", 512))
    batch_size = int(eval_cfg.get("batch_size", 64))
    split = eval_cfg.get("split", "test")
    del model_state  # the frozen tokenizer's params: self.tokenizer's
    upsampler = self.inference_model(params)
    start, seen = time.time(), 0
    up_psnr, bicubic_psnr, true_bicubic_psnr = [], [], []
    shown = None
    for batch in self._dataset(split, batch_size, shuffle=False, num_epochs=1,
                               drop_remainder=False):
      images = np.asarray(batch["image"])[:num_images - seen]
      target = np.asarray(batch["target"])[:num_images - seen]
      decoded, high = upsampler.upscale(images, batch_size)
      bicubic = np.asarray(to_uint8(upsampler_lib.bicubic(
          jnp.asarray(decoded, jnp.float32) / 255.0, self.factor)))
      true_bicubic = np.asarray(to_uint8(upsampler_lib.bicubic(
          jnp.asarray(images, jnp.float32) / 255.0, self.factor)))
      up_psnr.append(losses_lib.psnr_uint8(high, target))
      bicubic_psnr.append(losses_lib.psnr_uint8(bicubic, target))
      true_bicubic_psnr.append(losses_lib.psnr_uint8(true_bicubic,
                                                        target))
      if shown is None:
        shown = (target[:8], bicubic[:8], high[:8])
      seen += len(images)
      logging.info("upsampler eval: %d / %d images", seen, num_images)
      if seen >= num_images:
        break
    if not seen:
      raise ValueError(f"No images in split {split!r} (config.eval.split).")
    up, bic = np.concatenate(up_psnr), np.concatenate(bicubic_psnr)
    result = {
        "psnr": float(up.mean()),
        "bicubic_psnr": float(bic.mean()),
        "psnr_gain_db": float(up.mean() - bic.mean()),
        "bicubic_of_true_base_psnr": float(
            np.concatenate(true_bicubic_psnr).mean()),
        "factor": self.factor,
        "base_size": self.base_size,
        "num_images": int(seen),
        "steps": int(step),
        "eval_seconds": float(time.time() - start),
    }
    out_dir = os.path.join(workdir, "eval")
    reports.write_report(os.path.join(out_dir, "report.json"),
                         {**result, "split": split})
    if jax.process_index() == 0:
      save_comparison(*shown, os.path.join(out_dir, "comparison.png"))
    return result


def save_comparison(truth, bicubic, upsampled, path: str) -> None:
  """PNG: rows ground truth / bicubic / upsampler, one column per image."""
  rows = [np.concatenate(list(r), axis=1) for r in (truth, bicubic, upsampled)]
  gutter = np.full((4, rows[0].shape[1], 3), 255, np.uint8)
  grid = np.concatenate([rows[0], gutter, rows[1], gutter, rows[2]], axis=0)
  grids.save_image(Image.fromarray(grid), path)
