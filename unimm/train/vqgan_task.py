"""The ViT-VQGAN tokenizer task: losses, metrics, codebook upkeep, eval.

The GAN in the trainer's single-loss interface
-----------------------------------------------
params = {"generator": ViTVQGAN params, "discriminator": StyleGAN D params}.
The loss is the sum of two parts that touch disjoint parameters:

  generator part     = VQ + l2 + logit-Laplace + perceptual + adv_G, where
                       adv_G = softplus(-D(fake)) is evaluated with the
                       discriminator's params under stop_gradient (gradients
                       still flow through D's *input* into the generator);
  discriminator part = softplus(D(fake)) + softplus(-D(real)) + R1, with
                       the fake images under stop_gradient.

So one jax.value_and_grad of the total gives the generator exactly the
gradient of its own loss and the discriminator exactly the gradient of its
own loss; one optimizer step then updates both networks simultaneously
(the usual alternating GAN step, done jointly).

model_state = {"step", "usage" (EMA of per-code counts), "latent_buffer"
(recent encoder latents)}; update_params restarts dead codes from the
buffer every config.loss.restart_every steps, inside the jitted step.
"""
import os
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from unimm import config_lib
from unimm.data import pipeline
from unimm.evaluation import grids
from unimm.evaluation import probe as probe_lib
from unimm.evaluation import reports
from unimm.inference import tokenizer as tokenizer_lib
from unimm.tokenizers import losses as losses_lib
from unimm.tokenizers import quantizer as quantizer_lib
from unimm.tokenizers.discriminator import StyleGANDiscriminator
from unimm.tokenizers.vit_vqgan import ViTVQGAN, validate_config

LOSS_DEFAULTS = dict(
    # ViT-VQGAN §3.3: L = L_VQ + 0.1 L_adv + 0.1 L_perceptual
    #                     + 0.1 L_logit-laplace + 1.0 L_2.
    vq_weight=1.0,
    adversarial_weight=0.1,
    perceptual_weight=0.0,  # paper: 0.1; needs local LPIPS weights (below)
    perceptual_weights="",  # path to an LPIPS-VGG16 .npz (losses.py)
    logit_laplace_weight=0.1,
    l2_weight=1.0,
    adversarial_start_step=0,
    r1_gamma=10.0,  # R1 weight gamma/2 (StyleGAN2)
    r1_interval=4,  # lazy R1 (StyleGAN2 §B): every k steps, scaled by k
    r1_batch_size=0,  # R1 on this many real images (0 = the whole batch)
    usage_decay=0.99,
    dead_code_threshold=1.0,  # EMA tokens per batch below which a code is dead
    restart_every=100,  # steps between dead-code restarts (0 = never)
    restart_until_step=-1,  # no restarts after this step (-1 = always)
    latent_buffer_size=1024,
    # Which recent latents restart dead codes: "error" draws them with
    # probability proportional to their quantization error (k-means++
    # seeding), "uniform" draws them uniformly.
    restart_sampling="error",
    # LaVIT (config.model.keep_ratio > 0): weight of (keep_ratio - the
    # kept fraction)^2 (DynamicViT's ratio loss weight), the fraction taken
    # over the "batch" (images may differ) or per "image" (DynamicViT's).
    keep_weight=2.0,
    keep_penalty="batch",
    # SEED / LaVIT decoding through a frozen grid tokenizer
    # (config.model.teacher_codes > 0): weight of the cross-entropy of the
    # decoder's code logits against the teacher's ids.
    teacher_weight=1.0,
)


def _unboxed(tree):
  return nn.unbox(tree)


def _set_leaf(boxed_or_array, value):
  """Replaces an array that may be wrapped in flax partitioning metadata."""
  if isinstance(boxed_or_array, nn.meta.AxisMetadata):
    return boxed_or_array.replace_boxed(value)
  return value


class ViTVQGANTask:
  """Task for unimm.train.trainer: ViT-VQGAN + StyleGAN discriminator."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    config_lib.check_counts(config, "eval", positive=("num_images",
                                                      "batch_size"),
                            non_negative=("probe_prompts",))
    validate_config(**config.model.to_dict())
    self.model = config_lib.build_module(ViTVQGAN, config.model)
    loss = config_lib.with_defaults(LOSS_DEFAULTS, config, "loss")
    if loss["keep_penalty"] not in ("batch", "image"):
      raise ValueError(f"config.loss.keep_penalty={loss['keep_penalty']!r}; "
                       "expected 'batch' or 'image'.")
    if loss["restart_sampling"] not in ("error", "uniform"):
      raise ValueError(f"config.loss.restart_sampling="
                       f"{loss['restart_sampling']!r}; expected 'error' or "
                       "'uniform'.")
    self.loss_config = loss
    self.teacher = self._load_teacher()
    disc = (config.discriminator.to_dict() if "discriminator" in config
            else {})
    self.discriminator = config_lib.build_module(
        StyleGANDiscriminator, dict(image_size=self.model.image_size, **disc),
        "config.discriminator")
    self.perceptual_fn = None
    if loss["perceptual_weight"] > 0:
      path = loss["perceptual_weights"]
      if not path or not os.path.exists(path):
        raise ValueError(
            f"config.loss.perceptual_weight={loss['perceptual_weight']} needs "
            f"LPIPS-VGG16 weights at config.loss.perceptual_weights, got "
            f"{path!r}; convert them to .npz (see losses.load_lpips_npz) or "
            "set config.loss.perceptual_weight=0.")
      self.perceptual_fn = losses_lib.make_perceptual_loss(path)

  def _load_teacher(self):
    """The frozen grid tokenizer of config.teacher_workdir, checked against
    the model (config.model.teacher_codes > 0), or None."""
    workdir = self.config.get("teacher_workdir") or ""
    codes = self.model.teacher_codes
    if not codes:
      if workdir:
        raise ValueError(
            f"config.teacher_workdir={workdir!r} is set, but "
            "config.model.teacher_codes=0 decodes pixels; set teacher_codes "
            "to the teacher's num_codes (config arg teacher=... sets both).")
      return None
    if not workdir:
      raise ValueError(
          f"config.model.teacher_codes={codes} needs the frozen grid "
          "tokenizer's workdir in config.teacher_workdir (config arg "
          "teacher=WORKDIR).")
    teacher = tokenizer_lib.load_tokenizer(workdir)
    want = self.model.frozen_teacher_fields()
    have = {name: getattr(teacher.model, name) for name in want}
    wrong = {k: (have[k], v) for k, v in want.items() if have[k] != v}
    if wrong:
      raise ValueError(
          f"The teacher in {workdir!r} does not match this tokenizer: "
          + ", ".join(f"{k}={a!r} there, {b!r} here" for k, (a, b) in
                      sorted(wrong.items()))
          + "; the teacher must be a grid ViT-VQGAN of the same sizes "
          "(config.model; teacher_codes = its num_codes).")
    return teacher

  def dependencies(self) -> dict[str, str]:
    """The teacher's fingerprint, recorded with each checkpoint (its
    params are in the checkpoint too, so loading needs no teacher)."""
    if self.teacher is None:
      return {}
    return {"teacher_workdir": tokenizer_lib.fingerprint(self.teacher)}

  # ------------------------------------------------------------------ data

  def _dataset(self, split, batch_size, *, shuffle, seed, num_epochs,
               process_index=0, process_count=1, drop_remainder=True,
               in_memory=False):
    data = self.config.data
    return pipeline.image_text_dataset(
        data.source, split, batch_size=batch_size,
        image_size=self.model.image_size, shuffle=shuffle, seed=seed,
        num_epochs=num_epochs, process_index=process_index,
        process_count=process_count, data_dir=data.get("data_dir"),
        worker_count=data.get("worker_count", 0),
        drop_remainder=drop_remainder, in_memory=in_memory)

  def train_data(self, process_index: int, process_count: int):
    return self._dataset("train",
                         config_lib.per_host_batch_size(self.config, process_count),
                         shuffle=True, seed=self.config.seed, num_epochs=None,
                         process_index=process_index,
                         process_count=process_count,
                         in_memory=self.config.data.get("in_memory", False))

  # ------------------------------------------------------------------ init

  def init(self, rng, batch):
    images = jnp.asarray(batch["image"])
    self._check_images(images)
    g_rng, d_rng = jax.random.split(rng)
    # jit: op-by-op init is slow; inside the trainer's jit this is a no-op.
    generator = jax.jit(self.model.init)(
        {"params": g_rng, "dropout": g_rng}, images)
    discriminator = jax.jit(self.discriminator.init)(
        d_rng, jnp.zeros(images.shape, jnp.float32))
    params = {"generator": generator["params"],
              "discriminator": discriminator["params"]}
    if self.teacher is not None:  # the frozen grid's trained params
      boxed = params["generator"]["frozen_teacher"]
      trained = nn.unbox(self.teacher.params)
      params["generator"]["frozen_teacher"] = jax.tree.map(
          lambda leaf, value: _set_leaf(leaf, jnp.asarray(value)), boxed,
          trained, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    model_state = {
        "step": jnp.zeros((), jnp.int32),
        "usage": jnp.zeros((self.model.num_codes,), jnp.float32),
        "latent_buffer": jnp.zeros(
            (self.loss_config["latent_buffer_size"], self.model.code_dim),
            jnp.float32),
    }
    return params, model_state

  def _check_images(self, images):
    s, c = self.model.image_size, self.model.channels
    if images.ndim != 4 or images.shape[1:] != (s, s, c):
      raise ValueError(
          f"batch['image'] has shape {images.shape}; expected [B, {s}, {s}, "
          f"{c}] (config.model.image_size must match config.data.image_size).")

  # ------------------------------------------------------------------ loss

  def _discriminate(self, d_params, images01):
    """Discriminator logits [B] for images in [0, 1] (fed as [-1, 1])."""
    return self.discriminator.apply({"params": d_params},
                                    images01 * 2.0 - 1.0)

  def _adversarial_terms(self, d_params, recon, target, step):
    """(adv_G, adv_D, r1, real_logit, fake_logit); see the module docstring."""
    cfg = self.loss_config
    frozen_d = jax.lax.stop_gradient(d_params)
    g_adv = losses_lib.generator_adversarial_loss(
        self._discriminate(frozen_d, recon))
    fake_logits = self._discriminate(d_params, jax.lax.stop_gradient(recon))
    real_logits = self._discriminate(d_params, target)
    d_adv = losses_lib.discriminator_adversarial_loss(real_logits, fake_logits)
    # R1 on the first r1_batch_size real images (0 = all); the penalty is a
    # per-image mean, so a sub-batch estimates the same quantity.
    r1_images = target[:cfg["r1_batch_size"] or target.shape[0]]
    r1_fn = lambda: losses_lib.r1_penalty(  # noqa: E731
        lambda x: self._discriminate(d_params, x), r1_images)
    interval = max(int(cfg["r1_interval"]), 1)
    if interval == 1:
      r1 = r1_fn()
    else:
      # Lazy R1 (StyleGAN2 §B): every `interval` steps, scaled by interval.
      # Note: XLA:CPU runs convolutions inside lax.cond much more slowly than
      # outside, so on CPU prefer r1_interval=1 with a small r1_batch_size.
      r1 = jax.lax.cond(step % interval == 0,
                        lambda: r1_fn() * interval,
                        lambda: jnp.zeros((), jnp.float32))
    return (g_adv, d_adv, r1, jnp.mean(real_logits), jnp.mean(fake_logits))

  def loss(self, params, model_state, batch, rng):
    cfg = self.loss_config
    params = _unboxed(params)
    images = batch["image"]  # uint8 [B, H, W, C]
    target = images.astype(jnp.float32) / 255.0
    step = model_state["step"]
    dropout_rng, buffer_rng, selector_rng = jax.random.split(rng, 3)

    out = self.model.apply({"params": params["generator"]}, images,
                           train=True, rngs={"dropout": dropout_rng,
                                             "selector": selector_rng})
    recon = out["recon"]  # [B, H, W, C] in [0, 1]
    terms = {
        "vq": out["losses"]["vq"],
        "l2": losses_lib.l2_loss(recon, target),
        "logit_laplace": losses_lib.logit_laplace_nll(
            out["mu"], out["log_scale"], target),
    }
    if "teacher_logits" in out:  # the frozen grid's codes, by CE
      terms["teacher"] = jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(
              out["teacher_logits"], out["teacher_ids"]))
    if "keep" in out["losses"]:  # LaVIT's keep-ratio penalty
      terms["keep"] = out["losses"]["keep" if cfg["keep_penalty"] == "batch"
                                    else "keep_per_image"]
    if self.perceptual_fn is not None:
      terms["perceptual"] = self.perceptual_fn(recon, target)
    else:
      terms["perceptual"] = jnp.zeros((), jnp.float32)

    # Adversarial terms count from adversarial_start_step on. They are
    # computed every step and masked (rather than skipped with lax.cond,
    # which is slow on XLA:CPU); before the start D gets zero gradients.
    adv_on = (step >= cfg["adversarial_start_step"]).astype(jnp.float32)
    if cfg["adversarial_weight"] > 0:
      g_adv, d_adv, r1, real_logit, fake_logit = self._adversarial_terms(
          params["discriminator"], recon, target, step)
    else:
      g_adv = d_adv = r1 = real_logit = fake_logit = jnp.zeros((), jnp.float32)

    generator_loss = (cfg["vq_weight"] * terms["vq"] +
                      cfg["l2_weight"] * terms["l2"] +
                      cfg["logit_laplace_weight"] * terms["logit_laplace"] +
                      cfg["perceptual_weight"] * terms["perceptual"] +
                      adv_on * cfg["adversarial_weight"] * g_adv +
                      cfg["keep_weight"] * terms.get("keep", 0.0) +
                      cfg["teacher_weight"] * terms.get("teacher", 0.0))
    discriminator_loss = adv_on * (d_adv + 0.5 * cfg["r1_gamma"] * r1)
    total = generator_loss + discriminator_loss

    ids = out["ids"]  # LaVIT's empty slots are -1 and count nowhere
    latents = jax.lax.stop_gradient(out["latents"])  # [B, T, code_dim]
    usage = quantizer_lib.update_usage(model_state["usage"], ids,
                                       cfg["usage_decay"])
    flat_ids = ids.reshape(latents.shape[:-1])
    valid = flat_ids >= 0
    if cfg["restart_sampling"] == "error":
      errors = quantizer_lib.quantization_error(
          latents, jnp.maximum(flat_ids, 0), quantizer_lib.l2_normalize(
              params["generator"]["quantizer"]["codebook"])) * valid
    else:  # uniform over the valid tokens
      errors = None if "token_mask" not in out else valid.astype(jnp.float32)
    new_state = {
        "step": step + 1,
        "usage": usage,
        "latent_buffer": quantizer_lib.update_latent_buffer(
            model_state["latent_buffer"], latents, buffer_rng,
            errors=errors),
    }
    batch_counts = quantizer_lib.code_counts(ids, self.model.num_codes)
    metrics = {
        "loss": total,
        "generator_loss": generator_loss,
        "discriminator_loss": discriminator_loss,
        **{f"{k}_loss": v for k, v in terms.items()},
        "codebook_loss": out["losses"]["codebook"],
        "commitment_loss": out["losses"]["commitment"],
        "adversarial_g_loss": g_adv,
        "adversarial_d_loss": d_adv,
        "r1_penalty": r1,
        "d_real_logit": real_logit,
        "d_fake_logit": fake_logit,
        "adversarial_on": adv_on,
        "psnr": losses_lib.psnr(recon * 255.0, target * 255.0),
        "codebook_usage": jnp.mean(
            (usage >= cfg["dead_code_threshold"]).astype(jnp.float32)),
        "batch_codebook_usage": jnp.mean((batch_counts > 0).astype(
            jnp.float32)),
        "perplexity": quantizer_lib.perplexity(ids, self.model.num_codes),
    }
    if "teacher_logits" in out:
      metrics["teacher_code_accuracy"] = jnp.mean(
          jnp.argmax(out["teacher_logits"], -1) == out["teacher_ids"])
    if "keep" in out:
      metrics["kept_fraction"] = jnp.mean(out["keep"])
      metrics["tokens_per_image"] = jnp.mean(jnp.sum(valid, axis=-1))
    return total, (metrics, new_state)

  # ------------------------------------------------- dead-code restarts

  def update_params(self, params, model_state, rng):
    """Restarts dead codes every restart_every steps (runs inside jit)."""
    cfg = self.loss_config
    if not cfg["restart_every"]:
      return params, model_state
    step = model_state["step"]  # steps done, incremented by loss()
    due = (step % cfg["restart_every"] == 0) & (step > 0)
    if cfg["restart_until_step"] >= 0:
      due &= step <= cfg["restart_until_step"]
    quantizer = params["generator"]["quantizer"]
    boxed = quantizer["codebook"]
    codebook = _unboxed(boxed)
    new_codebook, new_usage, _ = quantizer_lib.restart_dead_codes(
        codebook, model_state["usage"], model_state["latent_buffer"], rng,
        cfg["dead_code_threshold"])
    codebook = jnp.where(due, new_codebook, codebook)
    usage = jnp.where(due, new_usage, model_state["usage"])
    params = {**params, "generator": {
        **params["generator"],
        "quantizer": {**quantizer, "codebook": _set_leaf(boxed, codebook)}}}
    return params, {**model_state, "usage": usage}

  def optimizer(self):
    return None  # the trainer's AdamW from config.optimizer

  # ------------------------------------------------------------------ eval

  def reconstruct(self, params, images):
    """uint8 [B, H, W, C] -> (ids [B, h, w], uint8 reconstructions)."""
    if not hasattr(self, "_reconstruct_fn"):
      def fn(generator_params, images):
        out = self.model.apply({"params": generator_params}, images)
        recon = jnp.round(out["recon"] * 255.0).astype(jnp.uint8)
        return out["ids"], recon
      # Every host evaluates the same images; replicated outputs can be
      # read on each host even when the parameters span several hosts.
      sharding = getattr(jax.tree.leaves(params)[0], "sharding", None)
      out = (jax.sharding.NamedSharding(sharding.mesh,
                                        jax.sharding.PartitionSpec())
             if isinstance(sharding, jax.sharding.NamedSharding) else None)
      self._reconstruct_fn = jax.jit(fn, out_shardings=out)
    ids, recon = self._reconstruct_fn(_unboxed(params)["generator"], images)
    return np.asarray(ids), np.asarray(recon)

  def evaluate(self, params, model_state, workdir: str, step: int) -> dict:
    """PSNR and codebook usage on held-out images; writes eval/ files."""
    del model_state
    eval_cfg = self.config.get("eval", ml_collections.ConfigDict())
    num_images = int(eval_cfg.get("num_images", 1024))
    batch_size = int(eval_cfg.get("batch_size", 128))
    split = eval_cfg.get("split", "validation")
    data = self._dataset(split, batch_size, shuffle=False,
                         seed=self.config.seed, num_epochs=1,
                         drop_remainder=False)
    return evaluate_reconstructions(
        self, params, iter(data), num_images, workdir, step,
        probe_prompts=int(eval_cfg.get("probe_prompts", 0)))


def evaluate_reconstructions(task, params, batches, num_images, workdir,
                             step, probe_prompts: int = 0):
  """Shared by evaluate(): consumes batches of {"image"} up to num_images.

  probe_prompts > 0 (config.eval.probe_prompts; shapes world only) adds
  reconstructed_prompt_accuracy_single / _pair and reconstructed_{shape,
  color}_accuracy: the shapes probe read on reconstructions of
  probe_prompts one-object and as many two-object scenes of the fixed
  prompt set, the ceiling of any text-to-image model on this tokenizer;
  and for 1-D tokens, tokens_per_image_single / _pair on those scenes.
  tokens_per_image_{mean,min,max}: valid ids per held-out image.
  """
  start = time.time()
  psnrs, lengths = [], []
  counts = np.zeros(task.model.num_codes, np.int64)
  originals, recons = [], []
  seen = 0
  for batch in batches:
    images = np.asarray(batch["image"])[:num_images - seen]
    ids, recon = task.reconstruct(params, images)
    psnrs.append(losses_lib.psnr_uint8(recon, images))
    flat = ids.reshape(len(ids), -1)
    lengths.append(np.sum(flat >= 0, axis=1))
    counts += np.bincount(flat[flat >= 0], minlength=task.model.num_codes)
    if seen < 32:
      originals.append(images[:32 - seen])
      recons.append(recon[:32 - seen])
    seen += len(images)
    if seen >= num_images:
      break
  if not seen:
    raise ValueError("evaluation found no images in the eval split "
                     "(config.eval.split / config.data.source).")
  psnr = np.concatenate(psnrs)
  result = {
      "psnr": float(psnr.mean()),
      "psnr_std": float(psnr.std()),
      "codebook_usage": float((counts > 0).mean()),
      "num_codes": int(task.model.num_codes),
      "num_images": int(seen),
      "steps": int(step),
  }
  lengths = np.concatenate(lengths)
  result.update(tokens_per_image_mean=float(lengths.mean()),
                tokens_per_image_min=int(lengths.min()),
                tokens_per_image_max=int(lengths.max()))
  if probe_prompts > 0:
    scene_lengths = []  # valid ids per probe scene, in the set's order

    def reconstruct(images):
      ids, recon = task.reconstruct(params, images)
      scene_lengths.append(np.sum(
          np.asarray(ids).reshape(len(ids), -1) >= 0, axis=1))
      return recon

    ceiling = probe_lib.reconstruction_accuracy(
        reconstruct, probe_prompts, probe_prompts, task.model.image_size)
    for key in ("prompt_accuracy_single", "prompt_accuracy_pair",
                "shape_accuracy", "color_accuracy"):
      result[f"reconstructed_{key}"] = ceiling[key]
    if not task.model.codes_on_grid:  # tokens spent on 1 and 2 objects
      scene_lengths = np.concatenate(scene_lengths)
      result["tokens_per_image_single"] = float(
          scene_lengths[:probe_prompts].mean())
      result["tokens_per_image_pair"] = float(
          scene_lengths[probe_prompts:].mean())
  result["eval_seconds"] = float(time.time() - start)
  out_dir = os.path.join(workdir, "eval")
  result = reports.write_report(os.path.join(out_dir, "report.json"), result)
  if jax.process_index() == 0:
    save_reconstruction_grid(np.concatenate(originals),
                             np.concatenate(recons),
                             os.path.join(out_dir, "reconstructions.png"))
  return result


def save_reconstruction_grid(originals, recons, path, columns: int = 8,
                             scale: int = 2):
  """PNG grid: each cell is an original beside its reconstruction."""
  grids.save_image_grid(grids.side_by_side(originals, recons), None, path,
                        columns=columns, cell=scale * originals.shape[1])
