"""The joint vocabulary of the decoder-only (interleaved) model.

One id space holds five specials, the SentencePiece text ids and the image
codes of the frozen ViT-VQGAN, in that order (Chameleon §2.1 and Gemini
share one vocabulary the same way). With T text ids and C image codes:

  | joint ids              | meaning                                   |
  |------------------------|-------------------------------------------|
  | 0                      | PAD: padding, never attended to           |
  | 1                      | BOS: begins a document                    |
  | 2                      | EOS: ends a document                      |
  | 3                      | BOI: begins an image span                 |
  | 4                      | EOI: ends an image span                   |
  | 5 ... 5 + T - 1        | text id t (SentencePiece) as 5 + t        |
  | 5 + T ... 5 + T + C - 1| image code c as 5 + T + c                 |

  size = 5 + T + C.

With read_ids (an image-input setting that reads images: patches or a
resampler, unimm.models.image_input), two more ids follow the codes:
READ = 5 + T + C (a slot that takes a reader embedding) and NEWLINE =
READ + 1 (ends a row of Fuyu patches); size = 5 + T + C + 2. A read image's
span is [BOI, READ / NEWLINE ..., EOI]; the image that opens a document
(and only it) is read, every other image is written as codes.

With location_bins = n > 0 (Kosmos-2 grounding, unimm.data.grounding), n*n
location ids follow: location l (cell row * n + col) is location_offset +
l, and a box is two of them, its top-left and bottom-right cells. They sit
in text runs ("where is the star?" -> LOC LOC).

SentencePiece's own pad and eos (ids 0 and 1 in the T5 layout) are never
used inside a document: documents are delimited by BOS/EOS and text spans
end where an image or the document begins, so joint ids 5 + pad and
5 + eos stay unused. An image span is always [BOI, h*w codes (row-major),
EOI], so its length is static and the sampler can decode it with one scan.

  layout = VocabLayout(text_vocab_size=64, image_vocab_size=512)
  layout.text_to_joint(text_ids)       # int32, same shape, + 5
  layout.image_span(codes)             # [h, w] -> [BOI, ..., EOI]
  layout.segments(document)            # back to ("text"/"image", ids) runs
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

from unimm.models import image_input as image_input_lib

PAD, BOS, EOS, BOI, EOI = 0, 1, 2, 3, 4
NUM_SPECIALS = 5
SPECIAL_NAMES = ("PAD", "BOS", "EOS", "BOI", "EOI")


def _as_int_array(ids: Any, what: str) -> np.ndarray:
  ids = np.asarray(ids)
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f"{what} must be integers; got dtype {ids.dtype} and "
                     f"shape {ids.shape}.")
  return ids.astype(np.int64)


def _check_range(ids: np.ndarray, low: int, high: int, what: str,
                 expected: str) -> None:
  if ids.size and (ids.min() < low or ids.max() >= high):
    bad = ids[(ids < low) | (ids >= high)]
    raise ValueError(
        f"{what} range over [{ids.min()}, {ids.max()}] ({bad.size} outside, "
        f"e.g. {bad.reshape(-1)[0]}); expected ids in [{low}, {high}) "
        f"({expected}).")


@dataclasses.dataclass(frozen=True)
class VocabLayout:
  """Specials, then text ids, then image codes (see the module table)."""
  text_vocab_size: int
  image_vocab_size: int
  read_ids: bool = False
  location_bins: int = 0

  PAD = PAD
  BOS = BOS
  EOS = EOS
  BOI = BOI
  EOI = EOI
  num_specials = NUM_SPECIALS

  def __post_init__(self):
    for name in ("text_vocab_size", "image_vocab_size"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        source = ("the SentencePiece vocab_size" if name.startswith("text")
                  else "the image tokenizer's num_codes")
        raise ValueError(f"VocabLayout {name}={value!r}; expected a positive "
                         f"int ({source}).")
      object.__setattr__(self, name, int(value))

  @property
  def text_offset(self) -> int:
    return NUM_SPECIALS

  @property
  def image_offset(self) -> int:
    return NUM_SPECIALS + self.text_vocab_size

  @property
  def code_end(self) -> int:
    """One past the last image code."""
    return NUM_SPECIALS + self.text_vocab_size + self.image_vocab_size

  @property
  def location_offset(self) -> int:
    """The id of location 0 (after the codes and READ / NEWLINE)."""
    return self.code_end + (2 if self.read_ids else 0)

  @property
  def size(self) -> int:
    """Total joint vocabulary (config.model.vocab_size)."""
    return self.location_offset + self.location_bins ** 2

  def location_to_joint(self, locations) -> np.ndarray:
    """Location indices in [0, location_bins**2) -> joint ids (int32)."""
    locations = _as_int_array(locations, "Locations")
    _check_range(locations, 0, self.location_bins ** 2, "Locations",
                 f"location_bins={self.location_bins} (config arg bins)")
    return (locations + self.location_offset).astype(np.int32)

  def is_location(self, ids):
    """bool mask of location ids."""
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    return (ids >= self.location_offset) & (ids < self.size)

  def model_ids(self) -> dict[str, int]:
    """The ids an InterleavedLM config takes from this layout: vocab_size,
    image_offset, read_id and newline_id."""
    return {"vocab_size": self.size, "image_offset": self.image_offset,
            "read_id": self.read_id, "newline_id": self.newline_id}

  @property
  def read_id(self) -> int:
    """READ: a slot that takes a reader embedding (-1 without read_ids)."""
    return self.code_end if self.read_ids else -1

  @property
  def newline_id(self) -> int:
    """NEWLINE: ends a row of read patches (-1 without read_ids)."""
    return self.code_end + 1 if self.read_ids else -1

  def is_read(self, ids):
    """bool mask of READ and NEWLINE ids (no loss: given, not written)."""
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    return (ids >= self.code_end) & (ids < self.location_offset)

  # ------------------------------------------------------------ conversions

  def text_to_joint(self, ids) -> np.ndarray:
    """SentencePiece ids in [0, text_vocab_size) -> joint ids (int32)."""
    ids = _as_int_array(ids, "Text ids")
    _check_range(ids, 0, self.text_vocab_size, "Text ids",
                 f"text_vocab_size={self.text_vocab_size}")
    return (ids + self.text_offset).astype(np.int32)

  def joint_to_text(self, ids) -> np.ndarray:
    """Joint ids of text tokens -> SentencePiece ids (int32)."""
    ids = _as_int_array(ids, "Joint ids")
    _check_range(ids, self.text_offset, self.image_offset,
                 "Joint ids given as text", "the text block of "
                 f"{self}; specials are [0, {NUM_SPECIALS}), image codes "
                 f"[{self.image_offset}, {self.size})")
    return (ids - self.text_offset).astype(np.int32)

  def image_to_joint(self, codes) -> np.ndarray:
    """Image codes in [0, image_vocab_size) -> joint ids (int32)."""
    codes = _as_int_array(codes, "Image codes")
    _check_range(codes, 0, self.image_vocab_size, "Image codes",
                 f"image_vocab_size={self.image_vocab_size}, the tokenizer's "
                 "num_codes")
    return (codes + self.image_offset).astype(np.int32)

  def joint_to_image(self, ids) -> np.ndarray:
    """Joint ids of image tokens -> image codes (int32)."""
    ids = _as_int_array(ids, "Joint ids")
    _check_range(ids, self.image_offset, self.code_end,
                 "Joint ids given as image codes", "the image block of "
                 f"{self}; specials are [0, {NUM_SPECIALS}), text "
                 f"[{self.text_offset}, {self.image_offset})")
    return (ids - self.image_offset).astype(np.int32)

  def is_text(self, ids):
    """bool mask of text ids (numpy or jax arrays alike)."""
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    return (ids >= self.text_offset) & (ids < self.image_offset)

  def is_image(self, ids):
    """bool mask of image ids (numpy or jax arrays alike)."""
    ids = ids if hasattr(ids, "dtype") else np.asarray(ids)
    return (ids >= self.image_offset) & (ids < self.code_end)

  def read_span(self, rows: int, cols: int, newline: bool) -> np.ndarray:
    """A read image's span: BOI, rows x (cols READ [+ NEWLINE]), EOI."""
    if not self.read_ids:
      raise ValueError("This layout has no READ ids; build it with "
                       "VocabLayout(..., read_ids=True).")
    row = [self.read_id] * cols + ([self.newline_id] if newline else [])
    return np.array([BOI] + row * rows + [EOI], np.int32)

  def image_span(self, codes) -> np.ndarray:
    """codes [h, w] -> int32 [n + 2]: BOI, the codes row-major, EOI. A
    dynamic tokenizer's ids ([1, P], the kept codes then -1 for empty
    slots, LaVIT) give a span of their n kept codes."""
    codes = np.asarray(codes)
    if codes.ndim != 2:
      raise ValueError(f"image_span expects one image's codes [h, w]; got "
                       f"shape {codes.shape}.")
    flat = codes.reshape(-1)
    n = int((flat >= 0).sum())
    if (flat[:n] < 0).any():
      raise ValueError("image_span got a code after an empty slot (-1); a "
                       "dynamic tokenizer's ids are the kept codes first, "
                       "then -1.")
    span = np.empty(n + 2, np.int32)
    span[0], span[-1] = BOI, EOI
    span[1:-1] = self.image_to_joint(flat[:n])
    return span

  # ------------------------------------------------------------ decoding

  def segments(self, ids) -> list[tuple[str, np.ndarray]]:
    """Splits one document's joint ids into its text and image runs.

    PAD, BOS and EOS are skipped (they delimit documents, not segments).
    Returns [("text", SentencePiece ids [n]) | ("image", codes [h*w])] in
    order; a read image's span gives ("read", its READ / NEWLINE ids) and
    a run of location ids ("location", location indices). Raises ValueError naming the position of a malformed stream: an
    image id outside a BOI..EOI span, a text/special id inside one, an EOI
    without BOI or a span never closed.
    """
    ids = _as_int_array(ids, "Joint ids").reshape(-1)
    _check_range(ids, 0, self.size, "Joint ids", f"the joint vocabulary of "
                 f"{self}, size {self.size}")
    runs: list[tuple[str, list[int]]] = []
    in_image = False
    for position, token in enumerate(ids.tolist()):
      if in_image:
        if token == EOI:
          in_image = False
        elif self.read_ids and self.code_end <= token < self.location_offset:
          runs[-1] = ("read", runs[-1][1] + [token])
        elif self.image_offset <= token:
          runs[-1][1].append(token)
        else:
          raise ValueError(
              f"Joint id {token} at position {position} is inside an image "
              "span (after BOI, before EOI), where only image codes "
              f"[{self.image_offset}, {self.size}) may appear.")
      elif token == BOI:
        in_image = True
        runs.append(("image", []))
      elif token in (PAD, BOS, EOS):
        continue
      elif token == EOI:
        raise ValueError(f"EOI at position {position} closes no image span.")
      elif token >= self.location_offset:
        if not runs or runs[-1][0] != "location":
          runs.append(("location", []))
        runs[-1][1].append(token)
      elif token >= self.image_offset:
        raise ValueError(f"Image id {token} at position {position} is outside "
                         "an image span; image codes must sit between BOI "
                         "and EOI.")
      else:
        if not runs or runs[-1][0] != "text":
          runs.append(("text", []))
        runs[-1][1].append(token)
    if in_image:
      raise ValueError("The last image span (BOI) is never closed by EOI.")
    convert = {"text": self.joint_to_text, "image": self.joint_to_image,
               "read": lambda run: np.asarray(run, np.int32),
               "location": lambda run: (np.asarray(run, np.int64)
                                        - self.location_offset).astype(
                                            np.int32)}
    return [(kind, convert[kind](run)) for kind, run in runs]


def encode_documents(documents: Sequence[Sequence[Any]], layout: VocabLayout,
                     text_pieces: Callable[[list[str]], list[np.ndarray]],
                     image_ids: Callable[[np.ndarray], np.ndarray], *,
                     end: bool = True) -> list[np.ndarray]:
  """Documents -> joint ids, each int32 [L_i]: [BOS], then per segment its
  text pieces (no EOS) or image_span(codes), then [EOS] when `end`.

  A segment is a str, a uint8 image [H, W, 3] or a box (anything with
  tl, br and bins, e.g. unimm.data.grounding.BoxTokens: two location ids,
  with the layout's location_bins). text_pieces(texts) ->
  SentencePiece ids per text and image_ids(uint8 [N, H, W, 3]) -> codes
  [N, h, w] are each called once, on all the documents' texts / images.
  """
  return encode_documents_and_reads(documents, layout, text_pieces,
                                    image_ids, end=end)[0]


def encode_documents_and_reads(
    documents: Sequence[Sequence[Any]], layout: VocabLayout,
    text_pieces: Callable[[list[str]], list[np.ndarray]],
    image_ids: Callable[[np.ndarray], np.ndarray], *, end: bool = True,
    image_input=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """encode_documents, with an image-input setting that reads images
  (unimm.models.image_input.ImageInput; None or "codes": none read).

  The image that opens a document becomes a read span (layout.read_span)
  and its pixel patches (uint8 [rows * cols, p*p*3], row-major) the
  document's reads; every other image is coded. Returns (tokens, reads):
  reads[i] uint8 [R_i, p*p*3] (R_i = 0 when nothing is read). Images read
  may have any size the setting reads ("patches"); coded images are
  encoded together, so they share one size.
  """
  reading = image_input is not None and image_input.reads_images
  if reading and not layout.read_ids:
    raise ValueError(f"image_input={image_input.kind!r} reads images but the "
                     "layout has no READ ids (VocabLayout(..., "
                     "read_ids=True)).")
  is_read = [[reading and j == 0 and _is_image(s)
              for j, s in enumerate(d)] for d in documents]
  texts = [s for d in documents for s in d if isinstance(s, str)]
  images = [s for d, r in zip(documents, is_read)
            for s, read in zip(d, r) if _is_image(s) and not read]
  text_ids = iter(text_pieces(texts) if texts else [])
  spans = []
  if images:
    codes = np.asarray(image_ids(np.stack(images)))  # [N, h, w]
    if codes.ndim != 3 or len(codes) != len(images):
      raise ValueError(
          f"image_ids returned shape {codes.shape} for {len(images)} "
          "images; expected [N, h, w] ids (e.g. Tokenizer.encode).")
    spans = [layout.image_span(c) for c in codes]
  spans = iter(spans)
  width = image_input.patch_size ** 2 * 3 if reading else 0
  tokens, reads = [], []
  for document, read_flags in zip(documents, is_read):
    parts = [np.array([BOS], np.int32)]
    document_reads = np.zeros((0, width), np.uint8)
    for segment, read in zip(document, read_flags):
      if isinstance(segment, str):
        parts.append(layout.text_to_joint(next(text_ids)))
      elif _is_box(segment):
        if segment.bins != layout.location_bins:
          raise ValueError(
              f"A box on a {segment.bins}x{segment.bins} grid but the layout "
              f"has location_bins={layout.location_bins} (config arg bins).")
        parts.append(layout.location_to_joint([segment.tl, segment.br]))
      elif read:
        image = np.asarray(segment)
        if image.dtype != np.uint8:
          raise ValueError(f"An image to read has dtype {image.dtype}; "
                           "expected uint8 pixels.")
        rows, cols = image_input.check_image(image.shape)
        parts.append(layout.read_span(rows, cols,
                                      newline=image_input.kind == "patches"))
        document_reads = image_input_lib.patchify(image,
                                                  image_input.patch_size)
      else:
        parts.append(next(spans))
    if end:
      parts.append(np.array([EOS], np.int32))
    tokens.append(np.concatenate(parts).astype(np.int32))
    reads.append(document_reads)
  return tokens, reads


def _is_box(segment) -> bool:
  return all(hasattr(segment, name) for name in ("tl", "br", "bins"))


def _is_image(segment) -> bool:
  return not isinstance(segment, str) and not _is_box(segment)
