"""Kosmos-2 style grounding on the shapes world: boxes as location tokens.

A box is quantised as Kosmos-2 does (Peng et al. 2023, §2.1): the image is
cut into `bins` x `bins` equal cells (Kosmos-2 uses 32; DEFAULT_BINS here),
cell (row, col) is location index row * bins + col, and a box is the pair
(top-left cell, bottom-right cell), written `<loc_TL><loc_BR>`. Boxes are
float (x0, y0, x1, y1) in pixels, x to the right and y down, with
0 <= x0 < x1 <= image_size and the same for y: what shapes.object_boxes
returns.

  tokens = box_to_locations(box, image_size, bins)   # BoxTokens(tl, br, bins)
  locations_to_box(tokens, image_size)               # back to pixels

Encoding (Kosmos-2's): with coordinates scaled to bins, tl = (floor(y0),
floor(x0)) and br = (ceil(y1) - 1, ceil(x1) - 1), so the cells from tl to br
are exactly the cells the box overlaps. Decoding puts each coordinate at its
cell's centre, and where tl and br share a column (row) spans that cell's
full width (height), so a box never decodes to zero area. Every coordinate
comes back within one bin (image_size / bins pixels) of the original, and
re-encoding a decoded box gives the same tokens. Quantisation alone costs
IoU: the object boxes of 32 px scenes decode at IoU >= 0.64 with 32 bins,
but a few small objects (about 2%) fall to 0.44 with 16 bins (2 px cells),
so score a model's boxes against the decoded target tokens to measure the
model alone.

Texts are lists of segments, each one of:

  str          plain text (SentencePiece words, stripped)
  Phrase(text) a phrase grounded by the BoxTokens right after it: <p>text</p>
  BoxTokens    a box: <box><loc_TL><loc_BR></box>

`to_text` writes the markup and `parse_text` reads it back, e.g.

  [Phrase("a big red star"), BoxTokens(17, 52, 16), "to the left of",
   Phrase("a small blue square"), BoxTokens(22, 71, 16)]
  <p>a big red star</p><box><loc_17><loc_52></box> to the left of
      <p>a small blue square</p><box><loc_22><loc_71></box>

The markers and location tokens are meant to become ids of their own in a
joint vocabulary (as Kosmos-2's <phrase>, <object> and <patch_index_*>);
`plain_text` drops the boxes and markers; `texts` lists the words
SentencePiece must cover, which are the captions' and NEW_WORDS. Builders,
for scene = shapes.Scene:

  grounded_caption(scene)         a shapes caption with every object's noun
                                  phrase grounded; its plain_text is
                                  shapes.caption(scene, template)
  referring_expression(scene, k)  ("where is the blue square?", [BoxTokens])
  where_answer(scene, phrase)     [BoxTokens], or the explicit not-found
                                  answer ["there is no blue square in this
                                  image"] when the phrase names no object
  draw_request(scene)             ["draw a red star in", BoxTokens, ...]

Objects are named as edit instructions name them (shapes.object_ref):
"the [COLOR] SHAPE", the colour only when both objects share the shape, so
the phrase picks out exactly one object (`object_phrase`); `find_object`
resolves such a phrase, raising ObjectNotFoundError (no object) or
AmbiguousPhraseError (several), both ValueErrors. `iou` and
`grounding_accuracy` (IoU >= 0.5, the RefCOCO criterion) score boxes.
"""
from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Sequence
from typing import Union

import numpy as np

from unimm.data import shapes

DEFAULT_BINS = 16
PHRASE_START, PHRASE_END = "<p>", "</p>"
BOX_START, BOX_END = "<box>", "</box>"
LOCATION_TOKEN = "<loc_{}>"
# What where_answer says when a phrase names no object in the scene.
NOT_FOUND_ANSWER = "there is no {} in this image"
WHERE_QUESTION = "where is {}?"
_EDGE_TOLERANCE = 1e-9  # in cells
DRAW_WORD = "draw"
# Words of the texts below that no caption holds.
NEW_WORDS = ("draw", "no", "this", "where")


class ObjectNotFoundError(ValueError):
  """A phrase names no object of the scene; the message is the not-found
  answer ("there is no blue square in this image")."""


class AmbiguousPhraseError(ValueError):
  """A phrase names more than one object of the scene."""


def check_bins(bins: int) -> int:
  """bins as an int; ValueError unless it is a positive int."""
  if (isinstance(bins, bool) or not isinstance(bins, (int, np.integer))
      or bins <= 0):
    raise ValueError(f"bins={bins!r}; expected a positive int (Kosmos-2 "
                     f"uses 32, the default here is {DEFAULT_BINS}).")
  return int(bins)


def _check_image_size(image_size) -> int:
  if (isinstance(image_size, bool)
      or not isinstance(image_size, (int, np.integer)) or image_size <= 0):
    raise ValueError(f"image_size={image_size!r}; expected a positive int "
                     "(the side in pixels).")
  return int(image_size)


def check_box(box, image_size: int) -> np.ndarray:
  """box as float64 [4]; ValueError unless 0 <= x0 < x1 <= image_size and
  0 <= y0 < y1 <= image_size."""
  image_size = _check_image_size(image_size)
  array = np.asarray(box, np.float64)
  if array.shape != (4,) or not np.isfinite(array).all():
    raise ValueError(f"box={box!r}; expected 4 finite numbers (x0, y0, x1, "
                     "y1) in pixels.")
  x0, y0, x1, y1 = array
  if not (0 <= x0 < x1 <= image_size and 0 <= y0 < y1 <= image_size):
    raise ValueError(
        f"box={tuple(float(v) for v in array)} is outside the "
        f"{image_size}x{image_size} image or empty; expected 0 <= x0 < x1 <= "
        f"{image_size} and 0 <= y0 < y1 <= {image_size}.")
  return array


# ---------------------------------------------------------------------------
# Boxes <-> location tokens.


@dataclasses.dataclass(frozen=True)
class BoxTokens:
  """A box as its two location indices on a bins x bins grid.

  tl, br: row * bins + col of the top-left and bottom-right cells, each in
  [0, bins * bins), with br's row and column >= tl's. Written
  <box><loc_TL><loc_BR></box>.
  """
  tl: int
  br: int
  bins: int = DEFAULT_BINS

  def __post_init__(self):
    bins = check_bins(self.bins)
    for name in ("tl", "br"):
      value = getattr(self, name)
      if (isinstance(value, bool) or not isinstance(value, (int, np.integer))
          or not 0 <= value < bins * bins):
        raise ValueError(f"Location {name}={value!r} is not on the "
                         f"{bins}x{bins} grid; expected an int in "
                         f"[0, {bins * bins}).")
    (tl_row, tl_col), (br_row, br_col) = (divmod(int(self.tl), bins),
                                          divmod(int(self.br), bins))
    if br_row < tl_row or br_col < tl_col:
      raise ValueError(
          f"Locations tl={self.tl} (row {tl_row}, col {tl_col}) and "
          f"br={self.br} (row {br_row}, col {br_col}) are not a top-left and "
          f"a bottom-right cell of the {bins}x{bins} grid; expected br's row "
          "and column >= tl's.")
    object.__setattr__(self, "tl", int(self.tl))
    object.__setattr__(self, "br", int(self.br))
    object.__setattr__(self, "bins", bins)

  @property
  def tokens(self) -> tuple[str, str]:
    """The two location tokens, ("<loc_TL>", "<loc_BR>")."""
    return LOCATION_TOKEN.format(self.tl), LOCATION_TOKEN.format(self.br)

  @property
  def text(self) -> str:
    """<box><loc_TL><loc_BR></box>."""
    return BOX_START + "".join(self.tokens) + BOX_END


def box_to_locations(box, image_size: int,
                     bins: int = DEFAULT_BINS) -> BoxTokens:
  """A pixel box (x0, y0, x1, y1) -> its Kosmos-2 location pair.

  The pair names the first and last cells the box overlaps on each axis.
  ValueError for a box outside the image or empty, or bins <= 0.
  """
  bins = check_bins(bins)
  image_size = _check_image_size(image_size)
  scaled = check_box(box, image_size) * (bins / image_size)
  # A coordinate within rounding of a cell edge is on it (so a decoded box
  # encodes to its own tokens whatever bins and image_size).
  nearest = np.rint(scaled)
  scaled = np.where(np.abs(scaled - nearest) < _EDGE_TOLERANCE, nearest,
                    scaled)
  x0, y0, x1, y1 = scaled
  first = [min(bins - 1, math.floor(v)) for v in (x0, y0)]
  last = [max(f, min(bins - 1, math.ceil(v) - 1))
          for f, v in zip(first, (x1, y1))]
  return BoxTokens(first[1] * bins + first[0], last[1] * bins + last[0],
                   bins)


def locations_to_box(tokens: BoxTokens, image_size: int) -> np.ndarray:
  """A location pair -> float64 [4] pixel box (x0, y0, x1, y1).

  Each coordinate goes to its cell's centre; on an axis where both cells
  are the same the box spans that cell (see the module doc).
  """
  image_size = _check_image_size(image_size)
  if not isinstance(tokens, BoxTokens):
    raise ValueError(f"tokens={tokens!r}; expected a BoxTokens.")
  bins = tokens.bins
  (tl_row, tl_col), (br_row, br_col) = (divmod(tokens.tl, bins),
                                        divmod(tokens.br, bins))
  coords = []
  for first, last in ((tl_col, br_col), (tl_row, br_row)):
    coords.append((first, last + 1) if first == last
                  else (first + 0.5, last + 0.5))
  (x0, x1), (y0, y1) = coords
  return np.array([x0, y0, x1, y1], np.float64) * (image_size / bins)


def iou(box_a, box_b) -> np.ndarray | float:
  """Intersection over union of boxes (..., 4) (x0, y0, x1, y1), broadcast.

  Identical boxes give 1, disjoint (or only touching) ones 0; two boxes of
  zero area give 0. A float for two single boxes, else an array.
  ValueError for a box with x1 < x0 or y1 < y0.
  """
  a = np.asarray(box_a, np.float64)
  b = np.asarray(box_b, np.float64)
  for name, value, given in (("box_a", a, box_a), ("box_b", b, box_b)):
    if value.ndim == 0 or value.shape[-1] != 4:
      raise ValueError(f"{name}={given!r}; expected boxes (..., 4) as (x0, "
                       "y0, x1, y1).")
    bad = (value[..., 2] < value[..., 0]) | (value[..., 3] < value[..., 1])
    if bad.any():
      raise ValueError(f"{name} has a box with x1 < x0 or y1 < y0: "
                       f"{value[bad][0].tolist()}; expected (x0, y0, x1, y1) "
                       "with x0 <= x1 and y0 <= y1.")
  width = np.clip(np.minimum(a[..., 2], b[..., 2])
                  - np.maximum(a[..., 0], b[..., 0]), 0, None)
  height = np.clip(np.minimum(a[..., 3], b[..., 3])
                   - np.maximum(a[..., 1], b[..., 1]), 0, None)
  inter = width * height
  area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
  area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
  union = area_a + area_b - inter
  result = np.where(union > 0, inter / np.where(union > 0, union, 1), 0.0)
  return float(result) if result.ndim == 0 else result


def grounding_accuracy(predicted, target, threshold: float = 0.5) -> float:
  """Fraction of predicted boxes [n, 4] with IoU >= threshold against their
  target boxes [n, 4] (RefCOCO's accuracy at 0.5). ValueError if the
  shapes differ or n == 0."""
  predicted = np.asarray(predicted, np.float64)
  target = np.asarray(target, np.float64)
  if (predicted.shape != target.shape or predicted.ndim != 2
      or predicted.shape[1] != 4 or not len(predicted)):
    raise ValueError(f"Box arrays of shapes {predicted.shape} and "
                     f"{target.shape}; expected the same [n, 4], n > 0.")
  return float(np.mean(iou(predicted, target) >= threshold))


# ---------------------------------------------------------------------------
# Naming objects.


def _words(words) -> str:
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_PHRASE = re.compile(
    rf"(?:(?:the|a|an) )?(?:(?P<color>{_words(shapes.COLORS)}) )?"
    rf"(?P<shape>{_words(shapes.SHAPES)})")


def _normal(text: str) -> str:
  return " ".join(str(text).lower().split()).rstrip(".?!").strip()


def ref_text(ref: shapes.ObjectRef) -> str:
  """"the [color] shape" of an ObjectRef."""
  return f"the {ref.color} {ref.shape}" if ref.color else f"the {ref.shape}"


def object_ref(scene: shapes.Scene, index: int) -> shapes.ObjectRef:
  """The shortest ObjectRef that picks out scene.objects[index] alone: the
  shape, with the colour when both objects share the shape (as
  shapes.object_ref, with the shape instead of "it" for one object)."""
  if not 0 <= index < len(scene.objects):
    raise ValueError(f"Object index {index!r} is not in the scene's "
                     f"{len(scene.objects)} objects.")
  ref = shapes.object_ref(scene, index)
  return ref if ref is not None else shapes.ObjectRef(
      scene.objects[index].shape)


def object_phrase(scene: shapes.Scene, index: int) -> str:
  """"the [color] shape" naming scene.objects[index] uniquely."""
  return ref_text(object_ref(scene, index))


def parse_phrase(phrase: str) -> shapes.ObjectRef:
  """"[the|a|an] [COLOR] SHAPE" -> ObjectRef (case, spaces and a final
  period or question mark ignored). ValueError for anything else."""
  match = _PHRASE.fullmatch(_normal(phrase))
  if match is None:
    raise ValueError(f"Cannot read the phrase {phrase!r}; expected "
                     "'[the] [COLOR] SHAPE' with COLOR in "
                     f"{shapes.COLORS} and SHAPE in {shapes.SHAPES}.")
  return shapes.ObjectRef(match["shape"], match["color"])


def find_objects(scene: shapes.Scene,
                 phrase: str | shapes.ObjectRef) -> list[int]:
  """Indices of the scene's objects that `phrase` describes."""
  ref = phrase if isinstance(phrase, shapes.ObjectRef) else (
      parse_phrase(phrase))
  return [k for k, obj in enumerate(scene.objects) if ref.matches(obj)]


def not_found_answer(phrase: str | shapes.ObjectRef) -> str:
  """"there is no blue square in this image" for "the blue square"."""
  ref = phrase if isinstance(phrase, shapes.ObjectRef) else (
      parse_phrase(phrase))
  return NOT_FOUND_ANSWER.format(ref_text(ref)[len("the "):])


def find_object(scene: shapes.Scene,
                phrase: str | shapes.ObjectRef) -> int:
  """The index of the one object `phrase` names.

  Raises:
    ObjectNotFoundError: it names no object; the message is
      not_found_answer(phrase).
    AmbiguousPhraseError: it names several (add the colour).
    ValueError: the phrase is outside "[the] [COLOR] SHAPE".
  """
  found = find_objects(scene, phrase)
  if not found:
    raise ObjectNotFoundError(not_found_answer(phrase))
  if len(found) > 1:
    text = phrase if isinstance(phrase, str) else ref_text(phrase)
    have = [f"{o.color} {o.shape}" for o in scene.objects]
    raise AmbiguousPhraseError(
        f"{text!r} names {len(found)} objects in a scene with {have}; name "
        "one ('the COLOR SHAPE').")
  return found[0]


def absent_phrase(scene: shapes.Scene, rng: np.random.Generator) -> str:
  """"the COLOR SHAPE" of a (colour, shape) no object of the scene has,
  drawn uniformly: a phrase that names nothing (a negative example)."""
  present = {(o.color, o.shape) for o in scene.objects}
  absent = [(c, s) for s in shapes.SHAPES for c in shapes.COLORS
            if (c, s) not in present]
  color, shape = absent[int(rng.integers(len(absent)))]
  return f"the {color} {shape}"


# ---------------------------------------------------------------------------
# Segments and their markup.


@dataclasses.dataclass(frozen=True)
class Phrase:
  """Words grounded by the BoxTokens that follows: <p>text</p>."""
  text: str

  def __post_init__(self):
    text = " ".join(str(self.text).split())
    if not text or "<" in text or ">" in text:
      raise ValueError(f"Phrase text {self.text!r} is empty or holds markup; "
                       "expected words.")
    object.__setattr__(self, "text", text)


Segment = Union[str, Phrase, BoxTokens]


def to_text(segments: Sequence[Segment]) -> str:
  """The markup of segments: texts, phrases and boxes joined by spaces,
  except that a phrase's box follows its </p> directly (as Kosmos-2's
  </phrase><object>): "<p>a red star</p><box>...</box> above ...",
  "draw a red star in <box>...</box>"."""
  out, after_phrase = "", False
  for segment in segments:
    if isinstance(segment, BoxTokens):
      glue = "" if after_phrase or not out else " "
      piece = segment.text
    elif isinstance(segment, Phrase):
      glue = " " if out else ""
      piece = PHRASE_START + segment.text + PHRASE_END
    elif isinstance(segment, str):
      glue, piece = " " if out else "", " ".join(segment.split())
      if not piece:
        continue
    else:
      raise ValueError(f"Segment {segment!r} is not a str, Phrase or "
                       "BoxTokens.")
    out += glue + piece
    after_phrase = isinstance(segment, Phrase)
  return out


_MARKUP = re.compile(
    re.escape(PHRASE_START) + r"(?P<phrase>.*?)" + re.escape(PHRASE_END)
    + "|" + re.escape(BOX_START) + r"<loc_(?P<tl>\d+)><loc_(?P<br>\d+)>"
    + re.escape(BOX_END))


def parse_text(text: str, bins: int = DEFAULT_BINS) -> list[Segment]:
  """Markup (to_text's) -> segments; texts stripped, empty ones dropped.

  ValueError for a location off the bins x bins grid or a stray marker
  (<p>, </p>, <box>, </box> or <loc_...> outside a well-formed span).
  """
  bins = check_bins(bins)
  segments: list[Segment] = []

  def add_text(piece: str) -> None:
    if re.search(r"</?p>|</?box>|<loc_", piece):
      raise ValueError(f"Malformed grounding markup {piece.strip()!r} in "
                       f"{text!r}; expected <p>words</p> and "
                       "<box><loc_I><loc_J></box>.")
    piece = " ".join(piece.split())
    if piece:
      segments.append(piece)

  start = 0
  for match in _MARKUP.finditer(text):
    add_text(text[start:match.start()])
    if match["phrase"] is not None:
      segments.append(Phrase(match["phrase"]))
    else:
      segments.append(BoxTokens(int(match["tl"]), int(match["br"]), bins))
    start = match.end()
  add_text(text[start:])
  return segments


def plain_text(segments: Sequence[Segment]) -> str:
  """The words alone: texts and phrase texts joined by spaces, no boxes."""
  return " ".join(" ".join(t.split()) for t in texts(segments) if t.strip())


def boxes(segments: Sequence[Segment]) -> list[BoxTokens]:
  """The segments' BoxTokens, in order."""
  return [s for s in segments if isinstance(s, BoxTokens)]


def texts(segments: Sequence[Segment]) -> list[str]:
  """The text of each str and Phrase segment: what a SentencePiece model
  for grounded documents must be trained on (with the captions)."""
  return [s if isinstance(s, str) else s.text for s in segments
          if not isinstance(s, BoxTokens)]


# ---------------------------------------------------------------------------
# Builders.


def object_locations(scene: shapes.Scene, image_size: int = 32,
                     bins: int = DEFAULT_BINS) -> list[BoxTokens]:
  """Each object's drawn box (shapes.object_boxes) as a location pair."""
  return [box_to_locations(box, image_size, bins)
          for box in shapes.object_boxes(scene, image_size)]


# {aK} [{zK}] {cK} {sK}: object K's noun phrase in a caption template.
_NOUN_PHRASE = re.compile(r"\{a(\d)\}(?: \{z\1\})? \{c\1\} \{s\1\}")


def grounded_caption(scene: shapes.Scene, image_size: int = 32,
                     bins: int = DEFAULT_BINS,
                     template: int | None = None) -> list[Segment]:
  """shapes.caption(scene, template) with each object's noun phrase ("a big
  red star") a Phrase followed by its BoxTokens.

  template: an index into shapes.TEMPLATES[len(scene.objects)]; None is
  shapes.COMPLETE_TEMPLATES's (every object's size, colour, shape and cell).
  plain_text of the result is the caption itself.
  """
  n = len(scene.objects)
  templates = shapes.TEMPLATES[n]
  if template is None:
    template = shapes.COMPLETE_TEMPLATES[n]
  if (isinstance(template, bool) or not isinstance(template, (int, np.integer))
      or not 0 <= template < len(templates)):
    raise ValueError(f"template={template!r} is out of range; a {n}-object "
                     f"scene has templates 0..{len(templates) - 1}.")
  locations = object_locations(scene, image_size, bins)
  text = templates[template]
  fields = {}
  if scene.relation is not None:
    fields["r"] = shapes.RELATION_PHRASES[scene.relation]
  for k, obj in enumerate(scene.objects):
    fields.update({f"z{k}": obj.size, f"c{k}": obj.color,
                   f"s{k}": obj.shape,
                   f"l{k}": shapes.LOCATION_PHRASES[obj.cell]})
  segments: list[Segment] = []
  start = 0
  for match in _NOUN_PHRASE.finditer(text):
    k = int(match[1])
    obj = scene.objects[k]
    before = text[start:match.start()].format(**fields).strip()
    if before:
      segments.append(before)
    words = (f"{obj.size} " if f"{{z{k}}}" in match[0] else "") + (
        f"{obj.color} {obj.shape}")
    segments += [Phrase(f"{_article(words)} {words}"), locations[k]]
    start = match.end()
  after = text[start:].format(**fields).strip()
  if after:
    segments.append(after)
  return segments


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def where_answer(scene: shapes.Scene, phrase: str | shapes.ObjectRef,
                 image_size: int = 32,
                 bins: int = DEFAULT_BINS) -> list[Segment]:
  """The answer to "where is PHRASE?": [BoxTokens] of the object it names,
  or [not_found_answer(phrase)] when it names none.

  AmbiguousPhraseError when it names several (never for object_phrase's).
  """
  try:
    index = find_object(scene, phrase)
  except ObjectNotFoundError as e:
    return [str(e)]
  return [object_locations(scene, image_size, bins)[index]]


def referring_expression(scene: shapes.Scene, index: int,
                         image_size: int = 32, bins: int = DEFAULT_BINS
                         ) -> tuple[str, list[Segment]]:
  """("where is the blue square?", [BoxTokens]) for scene.objects[index],
  named by object_phrase (unique in the scene)."""
  phrase = object_phrase(scene, index)
  return (WHERE_QUESTION.format(phrase),
          where_answer(scene, phrase, image_size, bins))


def draw_request(scene: shapes.Scene, image_size: int = 32,
                 bins: int = DEFAULT_BINS) -> list[Segment]:
  """A layout-conditioned drawing request for the scene: ["draw a red star
  in", BoxTokens] for one object, ["draw a red star in", BoxTokens, "and a
  blue square in", BoxTokens] for two; render(scene) is the answer. Sizes
  are left to the boxes."""
  segments: list[Segment] = []
  for k, (obj, tokens) in enumerate(zip(
      scene.objects, object_locations(scene, image_size, bins))):
    lead = DRAW_WORD if k == 0 else "and"
    segments += [f"{lead} {_article(obj.color)} {obj.color} {obj.shape} in",
                 tokens]
  return segments
