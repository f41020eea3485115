"""The public Python API: load trained models from a workdir.

  tok = unimm.load_tokenizer("workdirs/tokenizer")
  ids = tok.encode(images)        # uint8 [N, H, W, 3] -> int32 [N, h, w]
  images = tok.decode(ids)        # -> uint8 [N, H, W, 3]
  model = unimm.load_model("workdirs/demo")
  images = model.sample(prompts, seed=0, upscale=4)   # -> [N, 4H, 4W, 3]
  up = unimm.load_upsampler("workdirs/upsampler_x4")
  base, high = up.upscale(images)  # images at the tokenizer's resolution
"""
import dataclasses
import os
from typing import Any

from absl import logging
import jax
import ml_collections

from unimm.tokenizers import vit_vqgan
from unimm.train import tasks
from unimm.train import trainer


def saved_config(workdir: str, step: int | None = None
                 ) -> ml_collections.ConfigDict:
  """The config a workdir was trained with (stored with its checkpoints)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  manager = trainer.checkpoint_manager(workdir, read_only=True)
  try:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise ValueError(
          f"{workdir!r} has no checkpoint under "
          f"{os.path.join(workdir, trainer.CHECKPOINT_DIR)}; train it first "
          "(python -m unimm.main --config ... --workdir DIR).")
    saved = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))
  finally:
    manager.close()
  return ml_collections.ConfigDict(dict(saved["config"]))


def _local_mesh_config(config):
  config = ml_collections.ConfigDict(config.to_dict())
  # Load onto this host's devices, whatever mesh it was trained on.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))
  return config


@dataclasses.dataclass
class Tokenizer:
  """A trained ViT-VQGAN: encode images to ids and decode ids to images."""
  model: vit_vqgan.ViTVQGAN
  params: Any
  config: ml_collections.ConfigDict
  step: int

  @property
  def image_size(self) -> int:
    return self.model.image_size

  @property
  def grid(self) -> tuple[int, int]:
    return self.model.grid

  @property
  def num_codes(self) -> int:
    return self.model.num_codes

  def encode(self, images):
    """uint8 [N, H, W, 3] at image_size -> int32 ids [N, h, w]."""
    return vit_vqgan.encode_images(self.model, self.params, images)

  def decode(self, ids):
    """int ids [N, h, w] in [0, num_codes) -> uint8 images [N, H, W, 3]."""
    return vit_vqgan.decode_ids(self.model, self.params, ids)


def load_tokenizer(workdir: str, step: int | None = None) -> Tokenizer:
  """Loads the ViT-VQGAN trained in `workdir` (latest checkpoint by default)."""
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "vit_vqgan":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run, not a "
                     "tokenizer (config.task must be 'vit_vqgan').")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  params = jax.device_get(restored.params["generator"])
  return Tokenizer(task.model, params, config, int(restored.step))


@dataclasses.dataclass
class Upsampler:
  """A trained super-resolution module (Parti's upsampler) and its tokenizer."""
  task: Any
  params: Any
  model_state: Any
  config: ml_collections.ConfigDict
  step: int
  workdir: str

  @property
  def factor(self) -> int:
    return self.task.factor

  @property
  def base_size(self) -> int:
    return self.task.base_size

  @property
  def tokenizer(self) -> Tokenizer:
    return self.task.tokenizer

  def upsample_ids(self, ids):
    """Tokenizer ids [N, h, w] -> (decoded uint8 [N, s, s, 3], upsampled
    uint8 [N, s*factor, s*factor, 3])."""
    return self.task.upsample_ids(self.params, self.model_state, ids)

  def upscale(self, images):
    """uint8 [N, s, s, 3] at the tokenizer's resolution -> (their tokenizer
    reconstructions, upsampled uint8 [N, s*factor, s*factor, 3])."""
    return self.task.upscale(self.params, self.model_state, images)


def load_upsampler(workdir: str, step: int | None = None) -> Upsampler:
  """Loads the super-resolution module trained in `workdir`."""
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "upsampler":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run, not an "
                     "upsampler (configs/upsampler_shapes.py).")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return Upsampler(task, restored.params, restored.model_state, config,
                   int(restored.step), workdir)


@dataclasses.dataclass
class TextToImageModel:
  """A trained text-to-image model (Parti): prompts in, images out."""
  task: Any
  params: Any
  config: ml_collections.ConfigDict
  step: int
  upsamplers: dict[int, str] = dataclasses.field(default_factory=dict)

  def sample(self, prompts, *, seed: int = 0, cfg_scale: float | None = None,
             temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
             batch_size: int | None = None, upscale: int = 1,
             return_base: bool = False):
    """uint8 images [N, H, W, 3] for N prompts; deterministic per seed.

    cfg_scale None uses the config's eval.cfg_scale; 0 < s mixes the
    unconditional and conditional logits as u + s (c - u) (1 = plain
    conditional sampling). upscale 2 or 4 runs the matching upsampler on
    the sampled tokens (Parti's super-resolution stage) and returns images
    at upscale x the tokenizer's resolution (with return_base, the pair
    (base images, upscaled images)).
    """
    if cfg_scale is None:
      cfg_scale = self.config.get("eval", {}).get("cfg_scale", None)
    upsampler = self.upsampler(upscale) if upscale != 1 else None
    kwargs = dict(seed=seed, cfg_scale=cfg_scale, temperature=temperature,
                  top_k=top_k, top_p=top_p, batch_size=batch_size)
    if upsampler is None:
      return self.task.sample(self.params, list(prompts), **kwargs)
    ids = self.task.sample_ids(self.params, list(prompts), **kwargs)
    h, w = self.task.image_tokenizer.grid
    base, high = upsampler.upsample_ids(ids.reshape(-1, h, w))
    return (base, high) if return_base else high

  def upsampler(self, factor: int) -> Upsampler:
    """The loaded upsampler for `factor` (ValueError naming the fix)."""
    if factor not in self.upsamplers:
      raise ValueError(
          f"upscale={factor} but this model has upsamplers for "
          f"{sorted(self.upsamplers) or 'no factors'} "
          f"({self.upsamplers or 'none found'}); use one of "
          f"{[1] + sorted(self.upsamplers)}, or train one (python -m "
          f"unimm.main --config configs/upsampler_shapes.py:factor={factor} "
          f"--workdir DIR) and pass load_model(..., upsamplers=[DIR]) "
          "(--upsampler_workdir DIR).")
    cache = self.__dict__.setdefault("_loaded_upsamplers", {})
    if factor not in cache:
      upsampler = load_upsampler(self.upsamplers[factor])
      tokenizer = self.task.image_tokenizer
      if (upsampler.tokenizer.grid != tokenizer.grid or
          upsampler.tokenizer.num_codes != tokenizer.num_codes or
          upsampler.base_size != tokenizer.image_size or
          not _same_params(upsampler.tokenizer.params, tokenizer.params)):
        raise ValueError(
            f"The upsampler in {self.upsamplers[factor]!r} was trained on a "
            f"tokenizer with a {upsampler.tokenizer.grid} grid of "
            f"{upsampler.tokenizer.num_codes} codes at "
            f"{upsampler.base_size}px; this model's tokenizer has "
            f"{tokenizer.grid} / {tokenizer.num_codes} / "
            f"{tokenizer.image_size}px (or the same shapes with other "
            "weights). Train the upsampler with tokenizer_workdir= this "
            "model's tokenizer_workdir.")
      cache[factor] = upsampler
    return cache[factor]


def _left_pad(rows):
  """Token rows of different lengths -> int32 [B, longest], PAD on the
  left (the interleaved model does not see PAD)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  longest = max(len(r) for r in rows)
  return np.stack([np.pad(r, (longest - len(r), 0)) for r in rows])


@dataclasses.dataclass
class InterleavedModel:
  """A trained decoder-only interleaved model: documents of text and images.

  A segment is a str or a uint8 image [H, W, 3] at the tokenizer's
  resolution. cfg_scale guides image spans by the same document with its
  text dropped (trained with config.loss.drop_text_rate); None or 1 is
  plain sampling.
  """
  task: Any
  params: Any
  config: ml_collections.ConfigDict
  step: int
  tokenizer: Tokenizer
  text_tokenizer: Any

  @property
  def layout(self):
    return self.task.layout

  def _encode(self, documents) -> list[Any]:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    s = self.tokenizer.image_size
    rows = []
    for d, segments in enumerate(documents):
      if isinstance(segments, (str, np.ndarray)):
        segments = [segments]
      parts = [np.array([vocab.BOS])]
      for i, segment in enumerate(segments):
        if isinstance(segment, str):
          if not segment.strip():
            raise ValueError(f"Document {d}, segment {i} is empty text.")
          ids = self.text_tokenizer.pieces([segment])[0]
          parts.append(self.layout.text_to_joint(ids))
        else:
          image = np.asarray(segment)
          if image.dtype != np.uint8 or image.shape != (s, s, 3):
            raise ValueError(
                f"Document {d}, segment {i}: an image of shape {image.shape} "
                f"and dtype {image.dtype}; expected uint8 [{s}, {s}, 3], the "
                f"tokenizer's resolution (resize it to {s}x{s}).")
          codes = self.tokenizer.encode(image[None])[0]
          parts.append(self.layout.image_span(codes))
      rows.append(np.concatenate(parts).astype(np.int32))
    return rows

  def _text_ids(self):
    """bool [V]: text the model may write: SentencePiece pieces except its
    pad / eos (documents end with the joint EOS)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    ids = np.arange(self.layout.size)
    return np.asarray(self.layout.is_text(ids)) & ~np.isin(
        ids, self.layout.text_to_joint(np.array(
            [self.text_tokenizer.pad_id, self.text_tokenizer.eos_id])))

  def _continue(self, rows, *, seed, temperature, top_k, top_p,
                max_new_tokens, max_images, max_text_tokens=64,
                cfg_scale=None, image_temperature=None):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.models import interleaved  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    from unimm.sampling.sampler import SamplingParams  # pylint: disable=g-import-not-at-top
    model = self.task.model
    longest = max(len(r) for r in rows)
    room = max_new_tokens + max_text_tokens + model.image_length + 2
    if longest + room > model.max_len:
      raise ValueError(
          f"A document of {longest} tokens plus room to continue it "
          f"({room}) exceeds the model's context of {model.max_len} tokens "
          "(config.model.max_len); shorten the document or lower "
          "max_new_tokens.")
    prompts = _left_pad(rows)
    ids = np.arange(self.layout.size)
    text_ids = self._text_ids()
    sampling = SamplingParams(float(temperature), int(top_k),
                              float(top_p)).validate(self.layout.size)
    image_sampling = dataclasses.replace(
        sampling, cfg_scale=None if cfg_scale is None else float(cfg_scale),
        temperature=(sampling.temperature if image_temperature is None
                     else float(image_temperature))
    ).validate(self.layout.size)
    if (cfg_scale is not None and not self.config.get("loss", {}).get(
        "drop_text_rate", 0.0)):
      logging.warning(
          "cfg_scale=%s but this run was trained without dropped text "
          "(config.loss.drop_text_rate = 0): its unconditional half is a "
          "document the model never saw.", cfg_scale)
    out = interleaved.continue_documents(
        model, {"params": self.params}, prompts, jax.random.PRNGKey(seed),
        text_ids=text_ids,
        image_ids=np.asarray(self.layout.is_image(ids)),
        eos_id=vocab.EOS, boi_id=vocab.BOI, eoi_id=vocab.EOI,
        text_sampling=sampling, image_sampling=image_sampling,
        max_new_tokens=max_new_tokens, max_text_tokens=max_text_tokens,
        max_images=max_images, drop_ids=np.asarray(self.layout.is_text(ids)))
    return out

  def _segments(self, row) -> list[Any]:
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    row = [int(t) for t in row if t != vocab.PAD]
    if vocab.EOS in row:
      row = row[:row.index(vocab.EOS)]
    if vocab.BOI in row:
      last_boi = len(row) - row[::-1].index(vocab.BOI) - 1
      if vocab.EOI not in row[last_boi:]:  # an unfinished (unbudgeted) span
        row = row[:last_boi]
    h, w = self.tokenizer.grid
    segments = []
    for kind, ids in self.layout.segments(np.asarray(row, np.int64)):
      if kind == "text":
        segments.append(self.text_tokenizer.decode(
            np.asarray(ids, np.int32)[None])[0])
      else:
        segments.append(self.tokenizer.decode(
            np.asarray(ids, np.int32).reshape(1, h, w))[0])
    return segments

  def generate(self, segments, *, seed: int = 0, temperature: float = 1.0,
               top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 128,
               max_images: int = 2, max_text_tokens: int = 64,
               cfg_scale: float | None = None,
               image_temperature: float | None = None) -> list[Any]:
    """Continues one document: text, then an image when the model opens one
    (exactly h*w codes, EOI forced, guided by cfg_scale, sampled at
    image_temperature, default `temperature`), until EOS or the budget.
    Returns the new segments (str or uint8 [H, W, 3])."""
    return self.generate_batch(
        [segments], seed=seed, temperature=temperature, top_k=top_k,
        top_p=top_p, max_new_tokens=max_new_tokens, max_images=max_images,
        max_text_tokens=max_text_tokens, cfg_scale=cfg_scale,
        image_temperature=image_temperature)[0]

  def generate_batch(self, documents, *, seed: int = 0,
                     temperature: float = 1.0, top_k: int = 0,
                     top_p: float = 1.0, max_new_tokens: int = 128,
                     max_images: int = 2, max_text_tokens: int = 64,
                     cfg_scale: float | None = None,
                     image_temperature: float | None = None
                     ) -> list[list[Any]]:
    """generate() for several documents at once (one batch); a text run
    without BOI or EOS stops after max_text_tokens."""
    rows = self._encode(documents)
    out = self._continue(rows, seed=seed, temperature=temperature,
                         top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens, max_images=max_images,
                         max_text_tokens=max_text_tokens, cfg_scale=cfg_scale,
                         image_temperature=image_temperature)
    return [self._segments(row) for row in out]

  def caption(self, images, *, seed: int = 0, temperature: float = 0.0,
              max_new_tokens: int = 48, prompt: str | None = None,
              num_beams: int = 1, rerank_weight: float = 0.0) -> list[str]:
    """Captions for uint8 images [N, H, W, 3] (greedy by default).

    Each image is followed by `prompt` (default
    unimm.data.interleaved.CAPTION_PROMPT, as in the image-to-text training
    documents; "" for none), then the model writes the caption: sampled
    at `temperature` (0: greedy), or with num_beams > 1 by beam search
    (temperature must then be 0): the likeliest caption it finds, or with
    rerank_weight w > 0 the one of its num_beams final beams that
    maximises log p(caption | image) + w * log p(image | caption). The
    second term is the model's own text-to-image direction: the image's
    codes teacher-forced after the caption, as in the caption-then-image
    training documents (a caption that names the wrong places or shapes
    makes the image unlikely).
    """
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.data import interleaved  # pylint: disable=g-import-not-at-top
    from unimm.models import interleaved as model_lib  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    if not (isinstance(num_beams, int) and num_beams >= 1):
      raise ValueError(f"num_beams={num_beams!r}; expected an int >= 1 "
                       "(1 = no beam search).")
    if num_beams > 1 and temperature:
      raise ValueError(f"num_beams={num_beams} searches for the likeliest "
                       f"caption; temperature={temperature} samples one. "
                       "Pass temperature=0 or num_beams=1.")
    if not rerank_weight >= 0:
      raise ValueError(f"rerank_weight={rerank_weight!r}; expected >= 0 "
                       "(0 = no reranking).")
    if rerank_weight and num_beams == 1:
      raise ValueError(f"rerank_weight={rerank_weight} reranks the final "
                       "beams of a beam search; pass num_beams > 1 (e.g. 8) "
                       "or rerank_weight=0.")
    if prompt is None:
      prompt = interleaved.CAPTION_PROMPT
    rows = self._encode([[image, prompt] if prompt.strip() else [image]
                         for image in images])
    if num_beams > 1:
      beams, scores = model_lib.beam_search_text(
          self.task.model, {"params": self.params}, _left_pad(rows),
          text_ids=self._text_ids(), eos_id=vocab.EOS, beam_size=num_beams,
          max_text_tokens=max_new_tokens)
      best = np.zeros(len(rows), int)  # beams come best first
      if rerank_weight:
        # _encode's rows start [BOS, BOI, codes, EOI, ...].
        spans = [r[1:2 + self.task.model.image_length] for r in rows]
        scores = scores + rerank_weight * self._image_logprob(beams, spans)
        best = np.argmax(scores, axis=1)
      out = beams[np.arange(len(rows)), best]
    else:
      out = self._continue(rows, seed=seed, temperature=temperature,
                           top_k=0, top_p=1.0, max_new_tokens=max_new_tokens,
                           max_images=0, max_text_tokens=max_new_tokens)
    texts = []
    for row in out:
      text = [s for s in self._segments(row) if isinstance(s, str)]
      texts.append(" ".join(t.strip() for t in text))
    return texts

  def _image_logprob(self, beams, spans):
    """float [N, K]: log p(image | caption) for each of beams [N, K, T]
    (text ids, then EOS and PAD): the image's codes teacher-forced in the
    document [BOS, caption, BOI, codes]; spans[n] = image n's [BOI, codes]."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.models import interleaved as model_lib  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    n, k, _ = beams.shape
    rows, targets = [], []
    for i in range(n):
      for j in range(k):
        text = beams[i, j][(beams[i, j] != vocab.PAD)
                           & (beams[i, j] != vocab.EOS)]
        rows.append(np.concatenate([[vocab.BOS], text, spans[i]]))
        targets.append(np.arange(len(rows[-1])) > len(text) + 1)  # codes
    width = max(len(r) for r in rows)
    pad = lambda r: np.pad(r, (0, width - len(r)))  # noqa: E731
    return model_lib.sequence_logprob(
        self.task.model, {"params": self.params},
        np.stack([pad(r) for r in rows]),
        np.stack([pad(t) for t in targets])).reshape(n, k)

  def sample(self, prompts, *, seed: int = 0, temperature: float = 1.0,
             top_k: int = 0, top_p: float = 1.0,
             cfg_scale: float | None = None):
    """uint8 images [N, H, W, 3] for N prompts (text, then one image)."""
    import numpy as np  # pylint: disable=g-import-not-at-top
    from unimm.models import vocab  # pylint: disable=g-import-not-at-top
    if isinstance(prompts, str):
      raise ValueError("prompts must be a list of strings; wrap it in a list.")
    rows = [np.concatenate([r, [vocab.BOI]]).astype(np.int32)
            for r in self._encode([[p] for p in prompts])]
    image_length = self.task.model.image_length
    out = self._continue(rows, seed=seed, temperature=temperature,
                         top_k=top_k, top_p=top_p,
                         max_new_tokens=image_length + 1, max_images=1,
                         cfg_scale=cfg_scale)
    h, w = self.tokenizer.grid
    codes = out[:, :image_length] - self.layout.image_offset
    return self.tokenizer.decode(codes.reshape(-1, h, w))


def load_interleaved(workdir: str, step: int | None = None
                     ) -> InterleavedModel:
  """Loads an interleaved run with its image and text tokenizers."""
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") != "interleaved":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run, not "
                     "an interleaved one.")
  tokenizer_workdir = config.get("tokenizer_workdir") or ""
  if not tokenizer_workdir or not os.path.isdir(
      os.path.join(tokenizer_workdir, trainer.CHECKPOINT_DIR)):
    raise ValueError(
        f"The interleaved run in {workdir!r} names tokenizer_workdir="
        f"{tokenizer_workdir!r}, which holds no trained ViT-VQGAN; train it "
        "(configs/vit_vqgan_shapes.py) or set config.tokenizer_workdir.")
  text_path = config.get("text_tokenizer") or ""
  if not os.path.isfile(text_path):
    raise ValueError(
        f"The interleaved run in {workdir!r} names text_tokenizer="
        f"{text_path!r}, which does not exist; set config.text_tokenizer to "
        "its SentencePiece .model.")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return interleaved_model(task, restored.params, config, int(restored.step))


def interleaved_model(task, params, config, step: int) -> InterleavedModel:
  """An InterleavedModel over trained params, with config's tokenizers."""
  from unimm.tokenizers import text  # pylint: disable=g-import-not-at-top
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  return InterleavedModel(task, jax.device_get(nn.unbox(params)), config,
                          step, load_tokenizer(config.tokenizer_workdir),
                          text.TextTokenizer.load(config.text_tokenizer))


def _same_params(a, b) -> bool:
  """Whether two parameter trees hold the same values (same tokenizer)."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  return len(a) == len(b) and all(
      x.shape == y.shape and np.array_equal(np.asarray(x), np.asarray(y))
      for x, y in zip(a, b))


def _find_upsamplers(workdir: str, given) -> dict[int, str]:
  """factor -> workdir: the given ones, else a recipe's upsampler_x{f}/."""
  found = {}
  candidates = list(given or [])
  if not candidates:
    parent = os.path.dirname(os.path.abspath(workdir))
    for root in (workdir, parent):
      for factor in (2, 4):
        path = os.path.join(root, f"upsampler_x{factor}")
        if os.path.isdir(os.path.join(path, trainer.CHECKPOINT_DIR)):
          candidates.append(path)
  for path in candidates:
    config = saved_config(path)
    if config.get("task") != "upsampler":
      raise ValueError(f"{path!r} holds a {config.get('task')!r} run, not an "
                       "upsampler.")
    found.setdefault(int(config.model.factor), path)
  return found


def model_workdir(workdir: str) -> str:
  """An end-to-end recipe's parti/ stage, or `workdir` itself."""
  stage = os.path.join(workdir, "parti")
  if (not os.path.isdir(os.path.join(workdir, trainer.CHECKPOINT_DIR)) and
      os.path.isdir(os.path.join(stage, trainer.CHECKPOINT_DIR))):
    return stage
  return workdir


def load_model(workdir: str, step: int | None = None, *,
               upsamplers=None) -> TextToImageModel:
  """Loads the generative model trained in `workdir` (latest checkpoint).

  `workdir` is a Parti run, or an end-to-end recipe's workdir
  (configs/shapes_demo.py), whose model is in its parti/ stage.
  `upsamplers`: upsampler workdirs for sample(..., upscale=f); by default
  the recipe's upsampler_x2/ and upsampler_x4/ stages when present.
  """
  workdir = model_workdir(workdir)
  config = _local_mesh_config(saved_config(workdir, step))
  if config.get("task") == "interleaved":
    return load_interleaved(workdir, step)
  if config.get("task") != "parti":
    raise ValueError(f"{workdir!r} holds a {config.get('task')!r} run; "
                     "load_model expects a text-to-image run (config.task "
                     "'parti'); use unimm.load_tokenizer for tokenizers.")
  task = tasks.get_task(config)
  restored = trainer.restore(config, workdir, task, step)
  return TextToImageModel(task, restored.params, config, int(restored.step),
                          _find_upsamplers(workdir, upsamplers))
