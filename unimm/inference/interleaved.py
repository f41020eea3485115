"""A trained interleaved (decoder-only) model for inference.

Model + params + image and text tokenizers + sampling, nothing from
training. A document is a list of segments, each a str or a uint8 image
[H, W, 3] at the tokenizer's resolution (and, for a model with location
ids, a grounding.BoxTokens box or "<box><loc_i><loc_j></box>" markup in a
str); it is encoded to joint ids by
unimm.models.vocab.encode_documents (the one document encoder, shared with
the data pipeline), continued by one compiled sampler program
(unimm.models.interleaved.continue_documents: text runs to EOS or an image,
image spans of exactly h*w codes) and decoded back into segments.

A model with image_output "embeddings" (Emu) regresses each image span's
embeddings; sample() decodes them with its diffusion de-tokenizer
(config.detokenizer_workdir, condition "codes"), or without one by the
tokenizer's decoder on their nearest codes, as generate() does for the
images it writes.
"""
import dataclasses
import re
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
import ml_collections
import numpy as np

from unimm import checkpoints
from unimm import config_lib
from unimm.data import grounding
from unimm.data import interleaved as documents_lib
from unimm.evaluation import retrieval
from unimm.inference import detokenizer as detokenizer_lib
from unimm.inference import settings as settings_lib
from unimm.inference import tokenizer as tokenizer_lib
from unimm.models import image_input as image_input_lib
from unimm.models import interleaved as il
from unimm.models import vocab
from unimm.sampling import sampler as sampler_lib
from unimm.sampling.sampler import SamplingParams
from unimm.tokenizers import text as text_lib

EVAL = settings_lib.EVAL
# The settings of the interleaved eval (config.eval overrides them; the
# shapes config sets cfg_scale 1.5, image_temperature 0.5, 8 beams
# reranked at 0.5): text greedy, images at image_temperature (None: the
# text temperature), guided by cfg_scale (None: unguided) or decoded by
# CD-K with contrastive_alpha / contrastive_k (None: off), captions by
# beam search of caption_beams reranked by caption_rerank.
SAMPLING_DEFAULTS = dict(temperature=0.0, image_temperature=None,
                         cfg_scale=None, contrastive_alpha=None,
                         contrastive_k=1, sjd_window=0, caption_beams=1,
                         caption_rerank=0.0)


def left_pad(rows: Sequence[np.ndarray]) -> np.ndarray:
  """Token rows of different lengths -> int32 [B, longest], PAD on the
  left (the interleaved model does not see PAD)."""
  longest = max(len(r) for r in rows)
  return np.stack([np.pad(r, (longest - len(r), 0)) for r in rows])


@dataclasses.dataclass
class InterleavedModel:
  """A trained decoder-only interleaved model: documents of text and images.

  `settings` are the sampling settings of the model's eval (its config's
  eval section over SAMPLING_DEFAULTS); every argument left at its default
  takes them, so the API draws what the eval scored. cfg_scale guides image
  spans by the same document with its text dropped (trained with
  config.loss.drop_text_rate); None or 1 is plain sampling.
  contrastive_alpha decodes image spans by CD-K instead, with that
  text-dropped document as the amateur (same rules as Parti's: see
  unimm.inference.settings.resolve_guidance).
  """
  model: il.InterleavedLM
  layout: vocab.VocabLayout
  params: Any
  tokenizer: tokenizer_lib.Tokenizer
  text_tokenizer: text_lib.TextTokenizer
  config: ml_collections.ConfigDict
  step: int = 0
  path: str = ""
  detokenizer: Any = None  # image_output "embeddings": decodes sample()

  def __post_init__(self):
    if self.detokenizer is not None:
      check_detokenizer(self.model, self.detokenizer)
    if self.layout.size != self.model.vocab_size:
      raise ValueError(
          f"config.model.vocab_size={self.model.vocab_size} but the layout "
          f"(config.vocab) has {self.layout.size} ids; set vocab_size = 5 + "
          "text_vocab_size + image_vocab_size.")
    self.params = jax.device_get(nn.unbox(self.params))
    self.settings = settings_lib.eval_settings(SAMPLING_DEFAULTS,
                                               self.config)

  @property
  def image_length(self) -> int:
    return self.model.image_length

  @property
  def image_input(self) -> image_input_lib.ImageInput:
    """How the model reads given images (config.model.image_input)."""
    return image_input_lib.ImageInput.of(self.model)

  def _encode(self, documents) -> tuple[list[np.ndarray], Any]:
    """Documents (lists of segments; a bare str or image is one segment)
    -> (joint ids from BOS, without EOS (to be continued); the rows'
    reads [B, R, F], or None when the model reads no image). The image
    opening a document is read by the model's image-input setting;
    "patches" reads any multiple of its patch size, every other image must
    be at the tokenizer's resolution."""
    s = self.tokenizer.image_size
    reading = self.image_input.reads_images
    checked = []
    for d, segments in enumerate(documents):
      if isinstance(segments, (str, np.ndarray)):
        segments = [segments]
      segments = self._expand_boxes(d, list(segments))
      for i, segment in enumerate(segments):
        if isinstance(segment, grounding.BoxTokens):
          continue
        if isinstance(segment, str):
          if not segment.strip():
            raise ValueError(f"Document {d}, segment {i} is empty text.")
          continue
        image = np.asarray(segment)
        if (reading and i == 0 and self.image_input.kind == "patches"
            and image.dtype == np.uint8):
          self.image_input.check_image(image.shape)
        elif image.dtype != np.uint8 or image.shape != (s, s, 3):
          raise ValueError(
              f"Document {d}, segment {i}: an image of shape {image.shape} "
              f"and dtype {image.dtype}; expected uint8 [{s}, {s}, 3], the "
              f"tokenizer's resolution (resize it to {s}x{s}).")
        segments[i] = image
      checked.append(segments)
    rows, reads = vocab.encode_documents_and_reads(
        checked, self.layout, self.text_tokenizer.pieces,
        self.tokenizer.encode, end=False, image_input=self.image_input)
    return rows, self._stack_reads(reads)

  def _stack_reads(self, reads: Sequence[np.ndarray]):
    """Per-row pixel patches -> what the model reads [B, R, F] (zeros
    after a row's own; encoder tokens for "resampler"), or None."""
    if not self.image_input.reads_images or not any(len(r) for r in reads):
      return None
    longest = max(len(r) for r in reads)
    stacked = np.stack([np.pad(r, ((0, longest - len(r)), (0, 0)))
                        for r in reads])
    if self.image_input.kind == "resampler":
      return np.asarray(self.tokenizer.reader_features(
          stacked, self.image_input.patch_size))
    return stacked

  def _text_ids(self):
    """bool [V]: text the model may write: SentencePiece pieces except its
    pad / eos (documents end with the joint EOS)."""
    ids = np.arange(self.layout.size)
    return np.asarray(self.layout.is_text(ids)) & ~np.isin(
        ids, self.layout.text_to_joint(np.array(
            [self.text_tokenizer.pad_id, self.text_tokenizer.eos_id])))

  def _continue(self, rows, *, seed, temperature, top_k, top_p,
                max_new_tokens, max_images, max_text_tokens=64,
                cfg_scale=None, image_temperature=None,
                contrastive_alpha=None, contrastive_k=1, sjd_window=0,
                reads=None, text_ids=None, return_embeddings=False):
    temperature = settings_lib.resolve(temperature, self.settings,
                                       "temperature")
    sjd_window = settings_lib.resolve(sjd_window, self.settings,
                                      "sjd_window")
    image_temperature = settings_lib.resolve(
        image_temperature, self.settings, "image_temperature")
    cfg_scale, contrastive_alpha = settings_lib.resolve_guidance(
        self.settings, cfg_scale, contrastive_alpha)
    contrastive_k = settings_lib.resolve(contrastive_k, self.settings,
                                         "contrastive_k")
    model = self.model
    longest = max(len(r) for r in rows)
    room = max_new_tokens + max_text_tokens + model.image_length + 2
    if longest + room > model.max_len:
      raise ValueError(
          f"A document of {longest} tokens plus room to continue it "
          f"({room}) exceeds the model's context of {model.max_len} tokens "
          "(config.model.max_len); shorten the document or lower "
          "max_new_tokens.")
    prompts = left_pad(rows)
    ids = np.arange(self.layout.size)
    text_ids = self._text_ids() if text_ids is None else text_ids
    text = dict(temperature=temperature, top_k=top_k, top_p=top_p)
    sampling = SamplingParams.from_config(text, self.layout.size)
    image_sampling = SamplingParams.from_config(dict(
        text, cfg_scale=cfg_scale, contrastive_alpha=contrastive_alpha,
        contrastive_k=contrastive_k, sjd_window=sjd_window, temperature=(
            temperature if image_temperature is None else image_temperature)),
                                                self.layout.size)
    if image_sampling.doubled and not self.config.get("loss", {}).get(
        "drop_text_rate", 0.0):
      logging.warning(
          "cfg_scale=%s, contrastive_alpha=%s but this run was trained "
          "without dropped text (config.loss.drop_text_rate = 0): the "
          "unconditional half (guidance's, or CD-K's amateur) is a document "
          "the model never saw.", image_sampling.cfg_scale,
          image_sampling.contrastive_alpha)
    out = il.continue_documents(
        model, {"params": self.params}, prompts, sampler_lib.seed_key(seed),
        text_ids=text_ids,
        image_ids=np.asarray(self.layout.is_image(ids)),
        eos_id=vocab.EOS, boi_id=vocab.BOI, eoi_id=vocab.EOI,
        text_sampling=sampling, image_sampling=image_sampling,
        max_new_tokens=max_new_tokens, max_text_tokens=max_text_tokens,
        max_images=max_images, drop_ids=np.asarray(self.layout.is_text(ids)),
        reads=reads, return_embeddings=return_embeddings)
    return out

  def _segments(self, row) -> list[Any]:
    row = [int(t) for t in row if t != vocab.PAD]
    if vocab.EOS in row:
      row = row[:row.index(vocab.EOS)]
    if vocab.BOI in row:
      last_boi = len(row) - row[::-1].index(vocab.BOI) - 1
      if vocab.EOI not in row[last_boi:]:  # an unfinished (unbudgeted) span
        row = row[:last_boi]
    segments = []
    for kind, ids in self.layout.segments(np.asarray(row, np.int64)):
      if kind == "text":
        segments.append(self.text_tokenizer.decode(
            np.asarray(ids, np.int32)[None])[0])
      elif kind == "location":  # Kosmos-2's markup
        segments.append(self._location_text(ids))
      else:
        segments.append(self._decode_codes([ids])[0])
    return segments

  def _decode_codes(self, spans) -> np.ndarray:
    """Image codes of written spans (each [n]; n = h*w, or up to it with
    end_of_image) -> uint8 images [N, H, W, 3]."""
    h, w = self.tokenizer.grid
    ids = np.full((len(spans), h * w), -1, np.int32)
    for i, codes in enumerate(spans):
      codes = np.asarray(codes, np.int32).reshape(-1)
      if len(codes) > h * w or (len(codes) < h * w
                                and not self.model.end_of_image):
        raise ValueError(
            f"An image span of {len(codes)} codes; this model's tokenizer "
            f"decodes {'up to ' if self.model.end_of_image else ''}"
            f"{h * w}.")
      ids[i, :len(codes)] = codes
    return self.tokenizer.decode(ids.reshape(-1, h, w))

  def _location_text(self, locations) -> str:
    """A run of location indices as markup: each top-left / bottom-right
    pair "<box><loc_i><loc_j></box>" (grounding.parse_text reads it), any
    other id a bare "<loc_i>"."""
    out, rest = [], [int(i) for i in locations]
    while rest:
      try:
        box = grounding.BoxTokens(*rest[:2], self.layout.location_bins)
        out.append(box.text)
        rest = rest[2:]
      except (TypeError, ValueError):  # one id left, or no tl / br pair
        out.append(grounding.LOCATION_TOKEN.format(rest.pop(0)))
    return "".join(out)

  def _expand_boxes(self, d: int, segments: list[Any]) -> list[Any]:
    """Text with grounding markup ("draw a red star in
    <box><loc_17><loc_52></box>") -> its words and grounding.BoxTokens;
    a BoxTokens segment stays. ValueError for boxes given to a model
    without location ids, or on another grid."""
    bins = self.layout.location_bins
    out = []
    for i, segment in enumerate(segments):
      if isinstance(segment, str) and re.search(r"</?p>|</?box>|<loc_",
                                                segment):
        if not bins:
          raise ValueError(
              f"Document {d}, segment {i} holds grounding markup "
              f"({segment!r}) but this model has no location ids; train it "
              "with config arg bins=16 (docs/interleaved.md).")
        out += [s.text if isinstance(s, grounding.Phrase) else s
                for s in grounding.parse_text(segment, bins)]
      elif isinstance(segment, grounding.BoxTokens):
        if segment.bins != bins:
          raise ValueError(
              f"Document {d}, segment {i}: a box on a {segment.bins}x"
              f"{segment.bins} grid, but this model's location ids are "
              f"{bins}x{bins}" + (" (none: train with config arg bins=16)"
                                  if not bins else "") + ".")
        out.append(segment)
      else:
        out.append(segment)
    return out

  def generate(self, segments, *, seed: int = 0, temperature=EVAL,
               top_k: int = 0, top_p: float = 1.0, max_new_tokens: int = 128,
               max_images: int = 2, max_text_tokens: int = 64,
               cfg_scale=EVAL, image_temperature=EVAL,
               contrastive_alpha=EVAL, contrastive_k=EVAL,
               sjd_window=EVAL) -> list[Any]:
    """Continues one document: text, then an image when the model opens one
    (exactly h*w codes, EOI forced, guided by cfg_scale or decoded by CD-K
    with contrastive_alpha / contrastive_k, sampled at image_temperature),
    until EOS or the budget. Defaults: the eval's settings (`settings`).
    contrastive_alpha given with cfg_scale left at its default turns
    guidance off (CD-K replaces it); giving both is a ValueError.
    sjd_window W >= 2 decodes image spans by speculative Jacobi decoding
    (docs/parti.md; same distribution, fewer model calls). Returns
    the new segments (str or uint8 [H, W, 3]; location ids the model
    writes come as "<box><loc_i><loc_j></box>" markup). A continuous-output
    model with SEED-X's editing de-tokenizer draws each written image from
    its vectors and the image before it (_decode_edits); other
    continuous-output models show written vectors as their nearest codes."""
    return self.generate_batch(
        [segments], seed=seed, temperature=temperature, top_k=top_k,
        top_p=top_p, max_new_tokens=max_new_tokens, max_images=max_images,
        max_text_tokens=max_text_tokens, cfg_scale=cfg_scale,
        image_temperature=image_temperature,
        contrastive_alpha=contrastive_alpha, contrastive_k=contrastive_k,
        sjd_window=sjd_window)[0]

  def generate_batch(self, documents, *, seed: int = 0, temperature=EVAL,
                     top_k: int = 0, top_p: float = 1.0,
                     max_new_tokens: int = 128, max_images: int = 2,
                     max_text_tokens: int = 64, cfg_scale=EVAL,
                     image_temperature=EVAL, contrastive_alpha=EVAL,
                     contrastive_k=EVAL, sjd_window=EVAL) -> list[list[Any]]:
    """generate() for several documents at once (one batch); a text run
    without BOI or EOS stops after max_text_tokens."""
    rows, reads = self._encode(documents)
    editing = self._edits_by_detokenizer()
    out = self._continue(rows, reads=reads, seed=seed,
                         temperature=temperature,
                         top_k=top_k, top_p=top_p,
                         max_new_tokens=max_new_tokens, max_images=max_images,
                         max_text_tokens=max_text_tokens, cfg_scale=cfg_scale,
                         image_temperature=image_temperature,
                         contrastive_alpha=contrastive_alpha,
                         contrastive_k=contrastive_k, sjd_window=sjd_window,
                         return_embeddings=editing)
    if not editing:
      return [self._segments(row) for row in out]
    out, embeddings = out
    written = [self._segments(row) for row in out]
    self._decode_edits(documents, written, embeddings, seed)
    return written

  def _edits_by_detokenizer(self) -> bool:
    """Whether generate() decodes written images by the de-tokenizer: a
    continuous-output model whose de-tokenizer takes the image being
    edited (SEED-X's editing decoder, config.model.source_image). Other
    continuous-output models show written vectors as their nearest codes
    (the tokenizer's decoder)."""
    return (self.model.image_output != "codes"
            and self.detokenizer is not None
            and bool(self.detokenizer.model.source_image))

  def _decode_edits(self, documents, written, embeddings, seed: int) -> None:
    """Replaces, in place, each image of `written` (the segments
    generate_batch wrote) by the de-tokenizer's decoding of its regressed
    vectors, given the image before it (the document's last image, or the
    image written before) as the source; an image with none before it is
    decoded from its condition alone. A row's k-th written image is its
    k-th image phase (unimm.models.interleaved.continue_documents)."""
    s = self.tokenizer.image_size
    last = []
    for d, segments in enumerate(documents):
      if isinstance(segments, (str, np.ndarray)):
        segments = [segments]
      images = [np.asarray(x) for x in segments
                if not isinstance(x, (str, grounding.BoxTokens))]
      if images and images[-1].shape != (s, s, 3):
        raise ValueError(
            f"Document {d}: the image before the edit has shape "
            f"{images[-1].shape}; the de-tokenizer draws edits from a "
            f"source at its tokenizer's resolution, uint8 [{s}, {s}, 3] "
            f"(resize it to {s}x{s}).")
      last.append(images[-1] if images else None)
    for k, phase in enumerate(embeddings):
      slots = [[i for i, x in enumerate(row) if not isinstance(x, str)]
               for row in written]
      for with_source in (True, False):
        rows = [b for b in range(len(written)) if len(slots[b]) > k
                and (last[b] is not None) == with_source]
        if not rows:
          continue
        decoded = self.detokenizer.decode_conditions(
            np.asarray(phase)[rows], seed=seed + k,
            source=np.stack([last[b] for b in rows]) if with_source
            else None)
        for b, image in zip(rows, decoded):
          written[b][slots[b][k]] = image
          last[b] = image

  def caption(self, images, *, seed: int = 0, temperature: float = 0.0,
              max_new_tokens: int = 48, prompt: str | None = None,
              num_beams=EVAL, rerank_weight=EVAL,
              grounded: bool = False) -> list[str]:
    """Captions for uint8 images [N, H, W, 3].

    Defaults: the eval's settings (`settings`: caption_beams,
    caption_rerank; the shapes config uses 8 beams reranked at 0.5). Each
    image is followed by `prompt` (default
    unimm.data.interleaved.CAPTION_PROMPT, as in the image-to-text training
    documents; "" for none), then the model writes the caption: sampled
    at `temperature` (0: greedy; > 0 samples, and the beam settings then
    default to none) with num_beams=1, or by beam search with num_beams >
    1 (temperature must then be 0): the likeliest caption it
    finds, or with rerank_weight w > 0 the one of its num_beams final beams
    that maximises log p(caption | image) + w * log p(image | caption). The
    second term is the model's own text-to-image direction: the image's
    codes teacher-forced after the caption, as in the caption-then-image
    training documents (a caption that names the wrong places or shapes
    makes the image unlikely).

    grounded=True asks for Kosmos-2's grounded captions, as the
    grounded_caption training documents have them (a model with location
    ids, trained with --kinds ...,grounded_caption): the prompt defaults to
    unimm.data.interleaved.GROUNDED_PROMPT and each object's phrase is
    followed by its box, e.g. "a big red star <box><loc_17><loc_52></box>
    to the left of ..." (grounding.parse_text reads it; locations_to_box
    gives pixels). There is no reranking (rerank_weight must be 0).
    """
    allowed = self._text_ids()
    if grounded:
      self._check_bins("grounded captions", "grounded_caption")
      allowed = allowed | np.asarray(
          self.layout.is_location(np.arange(self.layout.size)))
      if rerank_weight is EVAL:
        rerank_weight = 0.0
      elif rerank_weight:
        raise ValueError(f"rerank_weight={rerank_weight}: grounded captions "
                         "are not reranked; pass rerank_weight=0.")
    if temperature:  # sampling asked for: the search settings do not apply
      num_beams = 1 if num_beams is EVAL else num_beams
      rerank_weight = 0.0 if rerank_weight is EVAL else rerank_weight
    num_beams = settings_lib.resolve(num_beams, self.settings,
                                     "caption_beams")
    rerank_weight = settings_lib.resolve(rerank_weight, self.settings,
                                         "caption_rerank")
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
    if rerank_weight:
      self._check_code_likelihood("rerank_weight > 0")
    if rerank_weight and num_beams == 1:
      raise ValueError(f"rerank_weight={rerank_weight} reranks the final "
                       "beams of a beam search; pass num_beams > 1 (e.g. 8) "
                       "or rerank_weight=0.")
    if prompt is None:
      prompt = (documents_lib.GROUNDED_PROMPT if grounded
                else documents_lib.CAPTION_PROMPT)
    rows, reads = self._encode([[image, prompt] if prompt.strip()
                                else [image] for image in images])
    if num_beams > 1:
      beams, scores = il.beam_search_text(
          self.model, {"params": self.params}, left_pad(rows),
          text_ids=allowed, eos_id=vocab.EOS, beam_size=num_beams,
          max_text_tokens=max_new_tokens, reads=reads)
      best = np.zeros(len(rows), int)  # beams come best first
      if rerank_weight:
        # The images' [BOI, codes] as a caption-then-image document has
        # them.
        spans = [self.layout.image_span(c)[:-1]
                 for c in self.tokenizer.encode(np.asarray(images))]
        scores = scores + rerank_weight * self._image_logprob(beams, spans)
        best = np.argmax(scores, axis=1)
      out = beams[np.arange(len(rows)), best]
    else:
      return self._write_text(rows, reads, seed=seed, temperature=temperature,
                              max_new_tokens=max_new_tokens, text_ids=allowed)
    return [self._text_of(row) for row in out]

  def _check_code_likelihood(self, what: str) -> None:
    """ValueError for `what` on a model that regresses embeddings: it gives
    codes no likelihood."""
    if self.model.image_output != "codes":
      raise ValueError(
          f"{what} scores an image by its codes' likelihood, but this model "
          f"regresses image embeddings (image_output="
          f"{self.model.image_output!r}) and gives codes none; use rerank_weight=0 (config arg rerank=0).")

  def _text_of(self, row) -> str:
    """The text of a continuation row (its text segments, joined)."""
    return " ".join(s.strip() for s in self._segments(row)
                    if isinstance(s, str))

  def _write_text(self, rows, reads, *, seed: int, temperature: float,
                  max_new_tokens: int, text_ids=None) -> list[str]:
    """Each row continued with text only (text_ids: bool [V], the ids it
    may write; default _text_ids()), until EOS or max_new_tokens."""
    out = self._continue(rows, reads=reads, seed=seed,
                         temperature=temperature, top_k=0, top_p=1.0,
                         max_new_tokens=max_new_tokens, max_images=0,
                         max_text_tokens=max_new_tokens, text_ids=text_ids)
    return [self._text_of(row) for row in out]

  def _check_bins(self, what: str, kind: str) -> int:
    """The layout's location bins; ValueError naming `what` without."""
    if not self.layout.location_bins:
      raise ValueError(
          f"This model has no location ids, which {what} needs: train it "
          f"with config arg bins=16 on rows packed with --kinds ...,{kind} "
          "(docs/interleaved.md).")
    return self.layout.location_bins

  def ground(self, images, phrases: Sequence[str]) -> list[Any]:
    """Where each phrase is in its image (Kosmos-2's referring
    expressions): image n read, then "where is PHRASE?" (as the refer
    training documents, e.g. phrase "the blue square"), then the model's
    greedy answer. Returns per image a float [4] pixel box (x0, y0, x1, y1)
    at that image's size, decoded from the two location ids the model
    wrote (unimm.data.grounding.locations_to_box), or None where it
    answered in words instead: the phrase names nothing it sees (training
    answers those with grounding.NOT_FOUND_ANSWER) or the ids are no
    top-left / bottom-right pair; it never makes a box up."""
    bins = self._check_bins("ground()", "refer")
    _check_one_text_per_image(images, phrases, "phrase")
    for i, phrase in enumerate(phrases):
      if not str(phrase).strip():
        raise ValueError(f"Phrase {i} is empty; name an object, e.g. "
                         "'the blue square'.")
    rows, reads = self._encode([
        [image, grounding.WHERE_QUESTION.format(" ".join(phrase.split()))]
        for image, phrase in zip(images, phrases)])
    allowed = self._text_ids() | np.asarray(
        self.layout.is_location(np.arange(self.layout.size)))
    out = self._continue(rows, reads=reads, seed=0, temperature=0.0, top_k=0,
                         top_p=1.0, max_new_tokens=2, max_images=0,
                         max_text_tokens=2, text_ids=allowed)
    boxes = []
    for image, row in zip(images, out):
      pair = np.asarray(row[:2])
      box = None
      if len(pair) == 2 and self.layout.is_location(pair).all():
        tl, br = (int(i) for i in pair - self.layout.location_offset)
        try:
          box = grounding.locations_to_box(
              grounding.BoxTokens(tl, br, bins), np.asarray(image).shape[0])
        except ValueError:  # not a top-left / bottom-right pair
          box = None
      boxes.append(box)
    return boxes

  def answer(self, images, questions: Sequence[str], *,
             max_new_tokens: int = 16) -> list[str]:
    """Greedy answers: image n, then questions[n], then the model's text
    until EOS, as in the question training documents
    (unimm.data.questions; one word each on shapes). A word can take a
    piece per letter ("purple" is 5 pieces of a 128-piece SentencePiece
    model): the default budget holds any answer of unimm.data.questions
    spelt so (questions.ANSWERS), and decoding stops once every row has
    written EOS."""
    _check_one_text_per_image(images, questions, "question")
    rows, reads = self._encode([[image, question] for image, question
                                in zip(images, questions)])
    return self._write_text(rows, reads, seed=0, temperature=0.0,
                            max_new_tokens=max_new_tokens)

  def _image_logprob(self, beams, spans):
    """float [N, K]: log p(image | caption) for each of beams [N, K, T]
    (text ids, then EOS and PAD): the image's codes teacher-forced in the
    document [BOS, caption, BOI, codes]; spans[n] = image n's [BOI, codes]."""
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
    return il.sequence_logprob(
        self.model, {"params": self.params},
        np.stack([pad(r) for r in rows]),
        np.stack([pad(t) for t in targets])).reshape(n, k)

  def _pair_scorer(self, images, captions):
    """score(image_index [R], caption_index [R]) -> (log p(image | caption),
    log p(caption | image)), each float [R], over these images (encoded
    once) and captions."""
    images = np.asarray(images)
    s = self.tokenizer.image_size
    if images.ndim != 4 or images.shape[1:] != (s, s, 3) or (
        images.dtype != np.uint8):
      raise ValueError(f"images of shape {images.shape} and dtype "
                       f"{images.dtype}; expected uint8 [N, {s}, {s}, 3], "
                       "the tokenizer's resolution.")
    if isinstance(captions, (str, bytes)):
      raise ValueError("captions must be a list of strings, got one string; "
                       "wrap it in a list.")
    self._check_code_likelihood("score() / retrieval_scores()")
    spans = [self.layout.image_span(c) for c in self.tokenizer.encode(images)]
    # How the model reads each image: codes read as the spans they are
    # written in; a reading setting's spans and pixel patches otherwise.
    read_spans, read_patches = spans, [np.zeros((0, 0), np.uint8)] * len(
        spans)
    if self.image_input.reads_images:
      read_rows, read_patches = vocab.encode_documents_and_reads(
          [[image] for image in images], self.layout,
          self.text_tokenizer.pieces, self.tokenizer.encode, end=False,
          image_input=self.image_input)
      read_spans = [r[1:] for r in read_rows]  # without BOS
    prompt = self.layout.text_to_joint(self.text_tokenizer.pieces(
        [documents_lib.CAPTION_PROMPT])[0])
    # Room for [BOS, BOI, codes, EOI, prompt, caption, EOS]: longer
    # captions are cut (both directions alike).
    room = self.model.max_len - max(len(spans[0]), len(read_spans[0])) - len(
        prompt) - 2
    texts = [self.layout.text_to_joint(p[:room])
             for p in self.text_tokenizer.pieces(list(captions))]
    bos, eos = np.array([vocab.BOS]), np.array([vocab.EOS])

    no_reads = read_patches[0][:0]

    def score(image_index, caption_index):
      rows, targets, reads = [], [], []
      for i, j in zip(image_index, caption_index):
        span, text = spans[i], texts[j]
        # log p(image | caption): the codes of [BOS, caption, BOI, codes, EOI].
        rows.append(np.concatenate([bos, text, span]))
        targets.append(np.arange(len(rows[-1])) > len(text) + 1)
        targets[-1][-1] = False  # EOI follows the codes by construction
        reads.append(no_reads)
        # log p(caption | image): the caption and EOS of
        # [BOS, image read, prompt, caption, EOS].
        read = read_spans[i]
        rows.append(np.concatenate([bos, read, prompt, text, eos]))
        targets.append(np.arange(len(rows[-1])) > len(read) + len(prompt))
        reads.append(read_patches[i])
      width = max(len(r) for r in rows)
      pad = lambda r: np.pad(r, (0, width - len(r)))  # noqa: E731
      logprobs = il.sequence_logprob(
          self.model, {"params": self.params},
          np.stack([pad(r) for r in rows]),
          np.stack([pad(t) for t in targets]),
          reads=self._stack_reads(reads)).reshape(-1, 2)
      return logprobs[:, 0], logprobs[:, 1]
    return score

  def score(self, images, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """How well N images and their N captions go together, by the model.

    Returns {"image_given_caption": log p(image_n | caption_n) (the codes
    teacher-forced after the caption, as in caption-then-image documents),
    "caption_given_image": log p(caption_n | image_n) (the caption and EOS
    after the image and CAPTION_PROMPT, as in image-then-caption
    documents)}, each float [N].
    """
    if len(images) != len(captions):
      raise ValueError(f"{len(images)} images but {len(captions)} captions; "
                       "expected one caption per image.")
    index = np.arange(len(images))
    image, caption = self._pair_scorer(images, captions)(index, index)
    return {"image_given_caption": image, "caption_given_image": caption}

  def retrieval_scores(self, images, captions: Sequence[str], *,
                       batch_size: int = 64) -> dict[str, np.ndarray]:
    """score() for every (image i, caption j) of N images and N captions:
    {"image_given_caption", "caption_given_image"}, each float [N, N]
    (row i: image i), for unimm.evaluation.retrieval.recall_at_k."""
    scorer = self._pair_scorer(images, captions)
    n = len(images)
    found = {}

    def image_scores(image_index, caption_index):
      image, caption = scorer(image_index, caption_index)
      for i, j, value in zip(image_index, caption_index, caption):
        found[int(i), int(j)] = value
      return image

    image = retrieval.score_matrix(image_scores, n, num_captions=len(captions),
                                   batch_size=batch_size)
    caption = np.array([[found[i, j] for j in range(len(captions))]
                        for i in range(n)], np.float64)
    return {"image_given_caption": image, "caption_given_image": caption}

  def sample(self, prompts: Sequence[str], *, seed: int = 0,
             temperature=EVAL, top_k: int = 0, top_p: float = 1.0,
             cfg_scale=EVAL, contrastive_alpha=EVAL, contrastive_k=EVAL,
             sjd_window=EVAL):
    """uint8 images [N, H, W, 3] for N prompts (text, then one image).

    Defaults: the eval's settings (`settings`): images at
    image_temperature, guided by cfg_scale (None: unguided), or decoded by
    CD-K with contrastive_alpha / contrastive_k against the text-dropped
    document. contrastive_alpha given with cfg_scale left at its default
    turns guidance off (CD-K replaces it); giving both is a ValueError.
    sjd_window W >= 2 decodes the images by speculative Jacobi decoding."""
    if isinstance(prompts, (str, bytes)):
      raise ValueError(f"prompts must be a list of strings, got one "
                       f"{type(prompts).__name__}; wrap it in a list.")
    temperature = settings_lib.resolve(temperature, self.settings,
                                       "image_temperature")
    if temperature is None:
      temperature = self.settings["temperature"]
    rows = [np.concatenate([r, [vocab.BOI]]).astype(np.int32)
            for r in self._encode([[p] for p in prompts])[0]]
    regressing = self.model.image_output != "codes"
    out = self._continue(rows, seed=seed, temperature=temperature,
                         top_k=top_k, top_p=top_p,
                         max_new_tokens=self.image_length + 1, max_images=1,
                         max_text_tokens=1,  # no text follows the image
                         cfg_scale=cfg_scale, image_temperature=temperature,
                         contrastive_alpha=contrastive_alpha,
                         contrastive_k=contrastive_k, sjd_window=sjd_window,
                         return_embeddings=regressing)
    if regressing:
      out, embeddings = out
      if self.detokenizer is not None:
        return self.detokenizer.decode_conditions(embeddings[0], seed=seed)
    span = out[:, :self.image_length]
    return self._decode_codes([self.layout.joint_to_image(r[r != vocab.PAD])
                               for r in span])


def _check_one_text_per_image(images, texts, what: str) -> None:
  """ValueError unless texts is a list of strings, one per image."""
  if isinstance(texts, (str, bytes)):
    raise ValueError(f"{what}s must be a list of strings, got one string; "
                     "wrap it in a list.")
  if len(images) != len(texts):
    raise ValueError(f"{len(images)} images but {len(texts)} {what}s; "
                     f"expected one {what} per image.")


def check_detokenizer(model: il.InterleavedLM,
                      detokenizer: detokenizer_lib.Detokenizer) -> None:
  """ValueError unless the de-tokenizer decodes what the model regresses:
  condition "codes" of image_length vectors of width embedding_dim."""
  shape = detokenizer_lib.condition_shape(detokenizer.condition,
                                          detokenizer.tokenizer.model)
  want = (model.image_length, model.embedding_dim)
  if model.image_output == "codes" or detokenizer.condition != "codes" \
      or shape != want:
    raise ValueError(
        f"The de-tokenizer in {detokenizer.path!r} decodes condition "
        f"{detokenizer.condition!r} of shape {shape}; this model "
        f"(image_output={model.image_output!r}) needs a de-tokenizer trained "
        f"with condition=codes on its tokenizer, {want} "
        "(config.detokenizer_workdir).")


def load_detokenizer_of(path: str, config, meta):
  """The de-tokenizer a run in `path` names (config.detokenizer_workdir),
  found like its tokenizer; None when it names none."""
  if not config.get("detokenizer_workdir"):
    return None
  return detokenizer_lib.load_detokenizer(checkpoints.resolve_path(
      config.detokenizer_workdir, path, meta, "detokenizer_workdir"))


def params_init(model: il.InterleavedLM,
                read_width: int = 0) -> checkpoints.InitFn:
  """init(rng, batch) of the params an interleaved run saves and loads;
  read_width: the width F of what its READ slots read (reading settings:
  patch_size**2 * 3 for "patches", the encoder's width for "resampler")."""
  def init(rng, batch):
    reads = None
    if model.image_input != "codes":
      reads = np.zeros((1, model.feature_length, read_width), np.float32)
    return {"params": model.init(rng, np.zeros(batch["tokens"].shape,
                                               np.int32),
                                 reads=reads)["params"]}
  return init


def read_width(model: il.InterleavedLM, tokenizer) -> int:
  """The width of what the model's READ slots read (0 for "codes")."""
  if model.image_input == "patches":
    return model.patch_size ** 2 * 3
  if model.image_input == "resampler":
    return int(tokenizer.model.encoder_embed_dim)
  return 0


def load_interleaved(path: str, step: int | None = None) -> InterleavedModel:
  """The interleaved model in `path` (a workdir or an export) with its
  image and text tokenizers."""
  step, config, meta = tokenizer_lib.saved_run(path, step, "interleaved",
                                               "an interleaved model")
  model = config_lib.build_module(il.InterleavedLM, config.model)
  layout = vocab.VocabLayout(
      text_vocab_size=int(config.vocab.text_vocab_size),
      image_vocab_size=int(config.vocab.image_vocab_size),
      read_ids=model.image_input != "codes",
      location_bins=int(config.vocab.get("location_bins", 0)))
  tokenizer = tokenizer_lib.load_dependency(path, config, meta)
  text_tokenizer = tokenizer_lib.load_text_dependency(
      path, config.get("text_tokenizer") or "", meta)
  restored = checkpoints.restore(
      path, params_init(model, read_width(model, tokenizer)), config, step)
  return InterleavedModel(model, layout, restored.params, tokenizer,
                          text_tokenizer, config, restored.step, path,
                          load_detokenizer_of(path, config, meta))
