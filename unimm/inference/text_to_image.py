"""A trained Parti model for inference: prompts in, images out.

Model + params + tokenizers + sampling, nothing from training. Prompts are
tokenized to the model's text length, one jitted `parti.sample_image_ids`
runs per batch (compiled once per model and SamplingParams) and the frozen
ViT-VQGAN decodes the ids; with an upsampler, Parti's super-resolution
stage maps the ids to 2x / 4x images.
"""
import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import psutil

from unimm import checkpoints
from unimm import config_lib
from unimm import parallel
from unimm import progress as progress_lib
from unimm.inference import settings as settings_lib
from unimm.inference import tokenizer as tokenizer_lib
from unimm.inference import upsampler as upsampler_lib
from unimm.models import parti
from unimm.sampling import sampler as sampler_lib
from unimm.sampling.sampler import SamplingParams
from unimm.tokenizers import text as text_lib

EVAL = settings_lib.EVAL

# The sampling settings of Parti's eval (config.eval overrides them); the
# API samples with the same ones unless told otherwise. contrastive_alpha
# None: no contrastive decoding (CD-K); it and cfg_scale are alternatives.
SAMPLING_DEFAULTS = dict(cfg_scale=3.0, temperature=1.0, top_k=0, top_p=1.0,
                         contrastive_alpha=None, contrastive_k=1,
                         sjd_window=0, batch_size=64)
TEXT_TOKENIZER_FILE = "text_tokenizer.model"  # in a pre-tokenized dir


def unconditional_text_ids(eos_id: int, text_length: int) -> np.ndarray:
  """The empty prompt as the text tokenizer writes it: [eos, 0, 0, ...]."""
  row = np.zeros((text_length,), np.int32)
  row[0] = eos_id
  return row


def estimate_sampling_bytes(model: parti.Parti, rows: int) -> int:
  """Rough device bytes of one sampling call with `rows` rows (2B with CFG
  or CD-K).

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
  return int(psutil.virtual_memory().available), "host memory"


def check_text_tokenizer(tokenizer: text_lib.TextTokenizer,
                         model: parti.Parti, path: str) -> None:
  """ValueError unless the SentencePiece model fits Parti's text input."""
  if tokenizer.pad_id != 0 or tokenizer.eos_id < 0:
    raise ValueError(
        f"Text tokenizer {path!r} has pad_id={tokenizer.pad_id}, eos_id="
        f"{tokenizer.eos_id}; Parti needs pad 0 and an EOS (T5 layout, "
        "as unimm.tokenizers.text.train_sentencepiece writes).")
  if tokenizer.vocab_size > model.text_vocab_size:
    raise ValueError(
        f"Text tokenizer {path!r} has {tokenizer.vocab_size} pieces but "
        f"config.model.text_vocab_size={model.text_vocab_size}; raise "
        "config.model.text_vocab_size (config arg text_vocab=...).")


def check_image_tokenizer(tokenizer: tokenizer_lib.Tokenizer,
                          model: parti.Parti) -> None:
  """ValueError unless the ViT-VQGAN's codes are the ones Parti writes."""
  h, w = tokenizer.grid
  if tokenizer.num_codes != model.image_vocab_size or (
      h * w != model.image_length):
    raise ValueError(
        f"The tokenizer in {tokenizer.path!r} has {tokenizer.num_codes} "
        f"codes and a {h}x{w} grid; config.model has image_vocab_size="
        f"{model.image_vocab_size}, image_length={model.image_length}. Make "
        "them match (config args codes=..., grid=...).")
  dynamic = bool(tokenizer.model.keep_ratio)
  if dynamic != bool(model.end_of_image):
    raise ValueError(
        f"The tokenizer in {tokenizer.path!r} writes "
        f"{'variable' if dynamic else 'fixed'}-length images (LaVIT "
        f"keep_ratio={tokenizer.model.keep_ratio}) but config.model."
        f"end_of_image={model.end_of_image}; set it to {dynamic} (config "
        f"arg dynamic={int(dynamic)}).")


@functools.lru_cache(maxsize=16)
def _jitted_sample(model: parti.Parti, sampling: SamplingParams):
  def sample(params, text_ids, rng, uncond_text_ids):
    return parti.sample_image_ids(model, {"params": params}, text_ids, rng,
                                  sampling, uncond_text_ids)
  return jax.jit(sample)


@dataclasses.dataclass
class TextToImageModel:
  """A trained text-to-image model (Parti): prompts in, images out.

  `settings` are the sampling settings of the model's eval (its config's
  eval section over SAMPLING_DEFAULTS); every argument of `sample` left at
  its default takes them, so the API draws what the eval scored.
  """
  model: parti.Parti
  params: Any
  text_tokenizer: text_lib.TextTokenizer
  image_tokenizer: tokenizer_lib.Tokenizer
  config: ml_collections.ConfigDict
  step: int = 0
  path: str = ""
  upsamplers: dict[int, Any] = dataclasses.field(default_factory=dict)
  mesh: jax.sharding.Mesh | None = None

  def __post_init__(self):
    check_text_tokenizer(self.text_tokenizer, self.model, self.path)
    check_image_tokenizer(self.image_tokenizer, self.model)
    if self.mesh is None:
      self.mesh = parallel.make_mesh(self.config.mesh)
    self.rules = checkpoints.rules_of(self.config)
    self.settings = settings_lib.eval_settings(SAMPLING_DEFAULTS,
                                               self.config)
    self._placed = None

  @property
  def tokenizer(self) -> tokenizer_lib.Tokenizer:
    return self.image_tokenizer

  def unconditional_row(self) -> np.ndarray:
    return unconditional_text_ids(self.text_tokenizer.eos_id,
                                  self.model.text_length)

  def _batch_shards(self) -> int:
    return math.prod(self.mesh.shape[a]
                     for a in parallel.batch_axes(self.rules))

  def _on_mesh(self):
    """Params on this model's mesh (replicated if they live elsewhere)."""
    if self._placed is None or self._placed[0] is not self.params:
      params = nn.unbox(self.params)
      devices = set(self.mesh.devices.flat)
      if not all(isinstance(x, jax.Array) and x.sharding.device_set == devices
                 for x in jax.tree.leaves(params)):
        params = jax.device_put(params, parallel.replicated(self.mesh))
      self._placed = (self.params, params)
    return self._placed[1]

  def check_memory(self, batch_size: int, doubled: bool) -> None:
    """ValueError if one sampling batch will not fit (a rough estimate);
    doubled: guidance or CD-K, 2 rows per prompt."""
    rows = batch_size * (2 if doubled else 1)
    devices = list(self.mesh.devices.flat)
    # Rows are split over the batch shards; CPU devices share host memory.
    need = estimate_sampling_bytes(self.model, rows)
    if devices[0].platform != "cpu":
      need //= self._batch_shards()
    free, where = available_bytes(devices)
    if need > free:
      raise ValueError(
          f"Sampling {batch_size} prompts per batch"
          f"{' with CFG / CD-K (2x rows)' if doubled else ''} needs about "
          f"{need / 2**30:.2f} GiB (KV cache + activations) but "
          f"{free / 2**30:.2f} GiB of {where} is free; lower batch_size "
          "(config.eval.batch_size / sample(batch_size=...)).")

  def sampling_params(self, cfg_scale=EVAL, temperature=EVAL, top_k=EVAL,
                      top_p=EVAL, contrastive_alpha=EVAL,
                      contrastive_k=EVAL, sjd_window=EVAL) -> SamplingParams:
    """SamplingParams from the arguments, the eval's settings for EVAL
    (cfg_scale and contrastive_alpha by resolve_guidance)."""
    cfg_scale, contrastive_alpha = settings_lib.resolve_guidance(
        self.settings, cfg_scale, contrastive_alpha)
    given = dict(temperature=temperature, top_k=top_k, top_p=top_p,
                 contrastive_k=contrastive_k, sjd_window=sjd_window)
    resolved = {k: settings_lib.resolve(v, self.settings, k)
                for k, v in given.items()}
    return SamplingParams.from_config(
        dict(resolved, cfg_scale=cfg_scale,
             contrastive_alpha=contrastive_alpha),
        self.model.output_vocab_size)

  def sample_ids(self, prompts: Sequence[str], *, seed: int = 0,
                 cfg_scale=EVAL, temperature=EVAL, top_k=EVAL, top_p=EVAL,
                 contrastive_alpha=EVAL, contrastive_k=EVAL,
                 sjd_window=EVAL, batch_size=EVAL,
                 log_progress: bool = True) -> np.ndarray:
    """Image ids int32 [N, image_length] for N prompts (see `sample`)."""
    if isinstance(prompts, (str, bytes)):
      raise ValueError(f"prompts must be a list of strings, got one "
                       f"{type(prompts).__name__}; wrap it in a list.")
    prompts = list(prompts)
    if not prompts:
      raise ValueError("prompts is empty; pass at least one prompt.")
    key = sampler_lib.seed_key(seed)
    sampling = self.sampling_params(cfg_scale, temperature, top_k, top_p,
                                    contrastive_alpha, contrastive_k,
                                    sjd_window)
    batch_size = int(settings_lib.resolve(batch_size, self.settings,
                                          "batch_size"))
    if batch_size <= 0:
      raise ValueError(f"batch_size={batch_size}; expected > 0.")
    # Every batch has the same padded shape: one compile per SamplingParams.
    batch_size = min(batch_size, len(prompts))
    shards = self._batch_shards()
    batch_size = -(-batch_size // shards) * shards
    self.check_memory(batch_size, sampling.doubled)
    text_ids = self.text_tokenizer.encode(
        prompts, self.model.text_length).ids  # [N, S]; ValueError if empty

    sharding = parallel.batch_sharding(self.mesh, self.rules)
    params = self._on_mesh()
    uncond = None
    if sampling.doubled:  # the unconditional half: guidance's, CD-K's amateur
      uncond = jax.device_put(np.tile(self.unconditional_row(),
                                      (batch_size, 1)), sharding)
    fn = _jitted_sample(self.model, sampling)
    n = len(prompts)
    out = np.zeros((n, self.model.image_length), np.int32)
    progress = progress_lib.Progress(n, "sampled images") if (
        log_progress and n > batch_size) else None
    for index, begin in enumerate(range(0, n, batch_size)):
      rows = text_ids[begin:begin + batch_size]
      count = len(rows)
      if count < batch_size:  # pad with copies of the first prompt
        rows = np.concatenate([rows, np.repeat(rows[:1], batch_size - count,
                                               axis=0)])
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        ids = fn(params, jax.device_put(rows, sharding),
                 jax.random.fold_in(key, index), uncond)
      out[begin:begin + count] = np.asarray(ids)[:count]
      if progress:
        progress.update(begin + count)
    return out

  def decode(self, ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Image ids [N, image_length] -> uint8 images, in padded chunks of one
    size (one compiled decoder)."""
    h, w = self.image_tokenizer.grid
    ids = np.asarray(ids)
    if ids.ndim != 2 or ids.shape[1] != h * w:
      raise ValueError(f"decode expects ids of shape [N, {h * w}] (the "
                       f"image_length), got {ids.shape}.")
    if int(batch_size) <= 0:
      raise ValueError(f"batch_size={batch_size}; expected > 0.")
    if not len(ids):
      s = self.image_tokenizer.image_size
      return np.zeros((0, s, s, 3), np.uint8)
    chunk = min(int(batch_size), 256)
    images = []
    for begin in range(0, len(ids), chunk):
      part = ids[begin:begin + chunk]
      padded = np.concatenate([part, np.zeros(
          (chunk - len(part), part.shape[1]), part.dtype)])
      images.append(self.image_tokenizer.decode(
          padded.reshape(-1, h, w))[:len(part)])
    return np.concatenate(images)

  def sample(self, prompts: Sequence[str], *, seed: int = 0,
             cfg_scale=EVAL, temperature=EVAL, top_k=EVAL, top_p=EVAL,
             contrastive_alpha=EVAL, contrastive_k=EVAL, sjd_window=EVAL,
             batch_size=EVAL, upscale: int = 1, return_base: bool = False):
    """uint8 images [N, H, W, 3] for N prompts; deterministic per seed.

    Defaults: the model's eval settings (`settings`: by default cfg_scale
    3, temperature 1, no top-k / top-p, no CD-K). cfg_scale None samples
    without guidance; s >= 0 mixes u + s (c - u) (Parti §3; 1 = plain
    conditional sampling). contrastive_alpha in (0, 1] decodes by CD-K
    instead (CM3Leon; docs/parti.md): log p_c - log p_u over the head
    {v : p_c(v) >= alpha * p_c^(contrastive_k)}, the amateur p_u being the
    empty prompt. CD-K replaces guidance: contrastive_alpha given with
    cfg_scale left at its default turns guidance off (and a cfg_scale
    given with contrastive_alpha at its default turns CD-K off); giving
    both is a ValueError. sjd_window W >= 2 decodes the image tokens by
    speculative Jacobi decoding (docs/parti.md): the same distribution
    (greedy: the same images) in fewer decoder calls; 0 is one token per
    call. Prompts are tokenized to
    config.model.text_length (an empty prompt is a ValueError naming its
    index; longer ones are truncated, counted and warned about). Batch i
    draws with fold_in(PRNGKey(seed), i). upscale 2 or 4 runs the matching
    upsampler on the sampled tokens (Parti's super-resolution stage) and
    returns images at upscale x the tokenizer's resolution (with
    return_base, the pair (base images, upscaled images)). Bad settings,
    or a batch that would not fit in memory, raise ValueError before
    anything is compiled.
    """
    upsampler = self.upsampler(upscale) if upscale != 1 else None
    ids = self.sample_ids(prompts, seed=seed, cfg_scale=cfg_scale,
                          temperature=temperature, top_k=top_k, top_p=top_p,
                          contrastive_alpha=contrastive_alpha,
                          contrastive_k=contrastive_k, sjd_window=sjd_window,
                          batch_size=batch_size)
    if upsampler is None:
      return self.decode(ids, settings_lib.resolve(
          batch_size, self.settings, "batch_size"))
    h, w = self.image_tokenizer.grid
    base, high = upsampler.upsample_ids(ids.reshape(-1, h, w))
    return (base, high) if return_base else high

  def caption(self, *args, **kwargs):
    """Not for this model: Parti draws images from text only."""
    del args, kwargs
    raise TypeError(
        "caption() needs an interleaved model; this is a text-to-image "
        "(Parti) model, which only draws images from text. Train one with "
        "configs/interleaved_shapes.py and load it with unimm.load_model.")

  generate = caption

  def upsampler(self, factor: int) -> upsampler_lib.Upsampler:
    """The upsampler for `factor`, loaded on first use (ValueError naming
    the fix when there is none or it was trained on another tokenizer)."""
    if factor not in self.upsamplers:
      raise ValueError(
          f"upscale={factor} but this model has upsamplers for "
          f"{sorted(self.upsamplers) or 'no factors'}; use one of "
          f"{[1] + sorted(self.upsamplers)}, or train one (python -m "
          f"unimm.main --config configs/upsampler_shapes.py:factor={factor} "
          f"--workdir DIR) and pass load_model(..., upsamplers=[DIR]) "
          "(--upsampler_workdir DIR).")
    upsampler = self.upsamplers[factor]
    if isinstance(upsampler, str):
      upsampler = upsampler_lib.load_upsampler(upsampler)
      upsampler_lib.check_same_tokenizer(upsampler, self.image_tokenizer)
      self.upsamplers[factor] = upsampler
    return upsampler


def params_init(model: parti.Parti) -> checkpoints.InitFn:
  """init(rng, batch) of the params a Parti run saves and loads."""
  def init(rng, batch):
    return {"params": model.init(
        {"params": rng, "dropout": rng}, jnp.zeros(
            batch["text_ids"].shape, jnp.int32), jnp.zeros(
                batch["image_ids"].shape, jnp.int32))["params"]}
  return init


def load_text_to_image(path: str, step: int | None = None, *,
                       upsamplers=None) -> TextToImageModel:
  """The Parti model in `path` (a workdir or an export) with its tokenizers;
  `upsamplers`: upsampler folders for sample(..., upscale=f), by default
  the ones beside it (an export's or a recipe's upsampler_x2/, _x4/)."""
  step, config, meta = tokenizer_lib.saved_run(path, step, "parti",
                                               "a text-to-image model")
  model = config_lib.build_module(parti.Parti, config.model)
  image_tokenizer = tokenizer_lib.load_dependency(path, config, meta)
  text_path = config.get("text_tokenizer") or ""
  if not text_path:
    pretokenized = config.data.get("pretokenized_dir") or ""
    text_path = pretokenized and f"{pretokenized}/{TEXT_TOKENIZER_FILE}"
  text_tokenizer = tokenizer_lib.load_text_dependency(path, text_path, meta)
  restored = checkpoints.restore(path, params_init(model), config, step)
  return TextToImageModel(
      model, restored.params, text_tokenizer, image_tokenizer, config, restored.step, path,
      upsampler_lib.find_upsamplers(path, upsamplers), restored.mesh)
