"""The embedded shapes world: procedural scenes, renders and captions.

A scene is one or two coloured objects on a dark background. The canvas is a
3x3 grid of cells; each object sits in its own cell, has a shape, a colour
and a size, and with two objects the scene states how the first relates to
the second ("left of", "above", ...). Images and captions are both generated
from the scene, so the ground truth of every example is known exactly:

  images, captions, scenes = shapes.generate(num, seed, image_size=32)
  shapes.render(scene, image_size)          # uint8 [S, S, 3]
  shapes.caption(scene)                     # "a big red circle at the top left"
  shapes.parse_caption(text)                # back to shapes, colours, ...
  shapes.object_boxes(scene, image_size)    # pixel boxes [n, 4] of the render
  shapes.object_labels(scene)               # class indices for a probe

Geometry lives in continuous coordinates ([0, 1]^2, x to the right, y down)
and is antialiased by supersampling, so one scene rendered at 32 and at 128
pixels shows the same picture at two resolutions. Example i of
`generate(num, seed)` depends only on (seed, i): `np.random.default_rng(
[seed, i])` draws it, so data sets of any size are consistent prefixes of
one another.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

SHAPES = ("circle", "square", "triangle", "star", "cross", "diamond")
# Bright, saturated colours far apart in RGB (pairwise distance >= 100) and
# far from the dark backgrounds.
PALETTE = {
    "red": (225, 30, 30),
    "green": (40, 200, 50),
    "blue": (40, 80, 255),
    "yellow": (250, 235, 40),
    "purple": (175, 60, 235),
    "cyan": (40, 225, 235),
    "orange": (255, 135, 0),
    "white": (245, 245, 245),
}
COLORS = tuple(PALETTE)
SIZES = ("small", "big")
RELATIONS = ("left of", "right of", "above", "below")
GRID = 3  # the canvas is GRID x GRID cells
CELLS = tuple((row, col) for row in range(GRID) for col in range(GRID))
# Cell (row, col) -> its name; row 0 is the top.
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
# Cell -> the phrase captions use to place an object there.
LOCATION_PHRASES = {
    cell: ("in the center" if name == "center" else
           f"on the {name}" if name in ("left", "right") else f"at the {name}")
    for cell, name in CELL_NAMES.items()
}
RELATION_PHRASES = {"left of": "to the left of", "right of": "to the right of",
                     "above": "above", "below": "below"}
# Background styles: (name, colour at the top left, colour at the bottom
# right, gradient direction). Dark and low contrast: the tokenizer should
# spend its capacity on the objects.
BACKGROUNDS = (
    ("charcoal", (30, 30, 34), (30, 30, 34), "none"),
    ("navy", (18, 24, 44), (18, 24, 44), "none"),
    ("slate", (48, 52, 60), (24, 26, 30), "vertical"),
    ("moss", (20, 36, 28), (40, 32, 24), "diagonal"),
)
# Half the object's extent, as a fraction of the cell side: a big object
# spans 90% of its cell side, a small one a bit over half.
SIZE_HALF_EXTENT = {"small": 0.28, "big": 0.45}
# Largest offset of an object's centre from its cell's centre (cell units),
# so that even a jittered object stays inside its cell.
SIZE_MAX_OFFSET = {"small": 0.14, "big": 0.04}
MIN_IMAGE_SIZE, MAX_IMAGE_SIZE = 16, 1024

# Caption templates. Fields: {aK} article ("a"/"an"), {zK} size, {cK} colour,
# {sK} shape, {lK} location phrase of object K, {r} relation phrase.
ONE_OBJECT_TEMPLATES = (
    "{a0} {z0} {c0} {s0} {l0}",
    "{a0} {c0} {s0} {l0}",
    "{a0} {z0} {c0} {s0}",
    "{l0}, {a0} {z0} {c0} {s0}",
    "there is {a0} {z0} {c0} {s0} {l0}",
    "an image of {a0} {z0} {c0} {s0} {l0}",
)
TWO_OBJECT_TEMPLATES = (
    "{a0} {c0} {s0} {r} {a1} {c1} {s1}",
    "{a0} {z0} {c0} {s0} {r} {a1} {z1} {c1} {s1}",
    "{a0} {c0} {s0} {r} {a1} {z1} {c1} {s1}",
    "{a0} {z0} {c0} {s0} {l0} and {a1} {z1} {c1} {s1} {l1}",
    "{a0} {z0} {c0} {s0} {l0}, {r} {a1} {z1} {c1} {s1}",
    "there is {a0} {c0} {s0} {r} {a1} {c1} {s1}",
)
TEMPLATES = {1: ONE_OBJECT_TEMPLATES, 2: TWO_OBJECT_TEMPLATES}
# Per object count, a template that states every object's size, colour,
# shape and cell: what to score a whole scene against.
COMPLETE_TEMPLATES = {1: 0, 2: 3}


@dataclasses.dataclass(frozen=True)
class Object:
  """One object: what it is and which grid cell (row, col) holds it.

  `offset` (dx, dy) shifts the object from its cell's centre, in cell units,
  for variety; it is not part of the object's identity (not compared).
  """
  shape: str
  color: str
  size: str
  cell: tuple[int, int]
  offset: tuple[float, float] = dataclasses.field(default=(0.0, 0.0),
                                                  compare=False)

  def __post_init__(self):
    _check_choice("shape", self.shape, SHAPES)
    _check_choice("color", self.color, COLORS)
    _check_choice("size", self.size, SIZES)
    cell = tuple(int(v) for v in self.cell)
    if cell not in CELL_NAMES:
      raise ValueError(f"Object cell {self.cell!r} is not a grid cell; "
                       f"expected (row, col) with row, col in 0..{GRID - 1}.")
    limit = SIZE_MAX_OFFSET[self.size]
    offset = tuple(float(v) for v in self.offset)
    if len(offset) != 2 or max(abs(v) for v in offset) > limit + 1e-9:
      raise ValueError(f"Object offset {self.offset!r} would leave its cell; "
                       f"expected (dx, dy) within +-{limit} for size "
                       f"{self.size!r}.")
    object.__setattr__(self, "cell", cell)
    object.__setattr__(self, "offset", offset)


@dataclasses.dataclass(frozen=True)
class Scene:
  """One or two objects, the first's relation to the second, a background.

  relation is None for one object; for two it is in RELATIONS and true of
  the cells ("left of": col0 < col1, "above": row0 < row1, ...).
  background indexes BACKGROUNDS.
  """
  objects: tuple[Object, ...]
  relation: str | None = None
  background: int = 0

  def __post_init__(self):
    objects = tuple(self.objects)
    object.__setattr__(self, "objects", objects)
    if len(objects) not in (1, 2):
      raise ValueError(f"A scene has 1 or 2 objects, got {len(objects)}.")
    if not 0 <= int(self.background) < len(BACKGROUNDS):
      raise ValueError(f"Scene background {self.background!r} is not in "
                       f"0..{len(BACKGROUNDS) - 1} (see BACKGROUNDS).")
    object.__setattr__(self, "background", int(self.background))
    if len(objects) == 1:
      if self.relation is not None:
        raise ValueError(f"A one-object scene has relation None, got "
                         f"{self.relation!r}.")
      return
    _check_choice("relation", self.relation, RELATIONS)
    first, second = objects
    if first.cell == second.cell:
      raise ValueError(f"The two objects share cell {first.cell}; expected "
                       "different cells.")
    if not relation_holds(self.relation, first.cell, second.cell):
      raise ValueError(
          f"Relation {self.relation!r} is false for cells {first.cell} and "
          f"{second.cell}; expected one of "
          f"{true_relations(first.cell, second.cell)}.")


@dataclasses.dataclass(frozen=True)
class ParsedObject:
  """An object as a caption states it; None where the caption is silent."""
  shape: str
  color: str
  size: str | None
  cell: tuple[int, int] | None


@dataclasses.dataclass(frozen=True)
class ParsedScene:
  """What `parse_caption` read: objects, relation (None if unstated) and
  the index of the template that matched (in TEMPLATES[len(objects)])."""
  objects: tuple[ParsedObject, ...]
  relation: str | None
  template: int


def _check_choice(setting: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {setting} {value!r}; expected one of "
                     f"{tuple(choices)}.")


# ---------------------------------------------------------------------------
# Relations between cells.


def relation_holds(relation: str, cell0: Sequence[int],
                   cell1: Sequence[int]) -> bool:
  """Whether `relation` is true of object 0 in cell0 w.r.t. object 1."""
  (row0, col0), (row1, col1) = cell0, cell1
  return {"left of": col0 < col1, "right of": col0 > col1,
          "above": row0 < row1, "below": row0 > row1}[relation]


def true_relations(cell0: Sequence[int],
                   cell1: Sequence[int]) -> tuple[str, ...]:
  """Every relation in RELATIONS that holds between the two cells."""
  return tuple(r for r in RELATIONS if relation_holds(r, cell0, cell1))


def _dominant_pairs(relation: str) -> list[tuple[tuple[int, int],
                                                 tuple[int, int]]]:
  """Cell pairs where `relation` holds along the axis of larger separation,
  so the relation is the obvious description (never a tie on a diagonal)."""
  pairs = []
  for cell0 in CELLS:
    for cell1 in CELLS:
      d_row, d_col = abs(cell0[0] - cell1[0]), abs(cell0[1] - cell1[1])
      horizontal = relation in ("left of", "right of")
      major, minor = (d_col, d_row) if horizontal else (d_row, d_col)
      if relation_holds(relation, cell0, cell1) and minor < major:
        pairs.append((cell0, cell1))
  return pairs


_RELATION_CELL_PAIRS = {r: _dominant_pairs(r) for r in RELATIONS}

# ---------------------------------------------------------------------------
# Sampling scenes.


def _check_num_objects(num_objects: int | Sequence[int]) -> tuple[int, ...]:
  counts = ((num_objects,) if isinstance(num_objects, (int, np.integer))
            else tuple(num_objects))
  if not counts or any(int(c) not in (1, 2) for c in counts):
    raise ValueError(f"num_objects={num_objects!r} is not supported; expected "
                     "1, 2 or a tuple of allowed counts from {1, 2}.")
  return tuple(int(c) for c in counts)


def _random_object(rng: np.random.Generator, shape: str, color: str,
                   cell: tuple[int, int]) -> Object:
  size = SIZES[rng.integers(len(SIZES))]
  limit = SIZE_MAX_OFFSET[size]
  offset = tuple(round(float(v), 4) for v in rng.uniform(-limit, limit, 2))
  return Object(shape, color, size, cell, offset)


def scene_from_rng(rng: np.random.Generator,
                   num_objects: int | Sequence[int] = (1, 2)) -> Scene:
  """A random scene. num_objects: a count or a tuple of allowed counts.

  Two objects differ in (shape, colour); the relation is drawn uniformly and
  the cells are drawn among those where it is the dominant direction.
  """
  counts = _check_num_objects(num_objects)
  count = counts[rng.integers(len(counts))]
  background = int(rng.integers(len(BACKGROUNDS)))
  kinds = len(SHAPES) * len(COLORS)
  first = int(rng.integers(kinds))
  if count == 1:
    cell = CELLS[rng.integers(len(CELLS))]
    obj = _random_object(rng, SHAPES[first // len(COLORS)],
                         COLORS[first % len(COLORS)], cell)
    return Scene((obj,), None, background)
  second = (first + 1 + int(rng.integers(kinds - 1))) % kinds  # != first
  relation = RELATIONS[rng.integers(len(RELATIONS))]
  pairs = _RELATION_CELL_PAIRS[relation]
  cell0, cell1 = pairs[rng.integers(len(pairs))]
  objects = tuple(
      _random_object(rng, SHAPES[k // len(COLORS)], COLORS[k % len(COLORS)],
                     cell)
      for k, cell in ((first, cell0), (second, cell1)))
  return Scene(objects, relation, background)


def _check_image_size(image_size: int) -> int:
  if (not isinstance(image_size, (int, np.integer))
      or not MIN_IMAGE_SIZE <= image_size <= MAX_IMAGE_SIZE):
    raise ValueError(f"image_size={image_size!r} is not supported; expected an "
                     f"int in [{MIN_IMAGE_SIZE}, {MAX_IMAGE_SIZE}] (e.g. 32, "
                     "64, 128, 256).")
  return int(image_size)


def generate(num: int, seed: int, image_size: int = 32,
             num_objects: int | Sequence[int] = (1, 2),
             ) -> tuple[np.ndarray, list[str], list[Scene]]:
  """`num` examples: uint8 images [num, S, S, 3], captions and scenes.

  Example i is drawn by np.random.default_rng([seed, i]): it depends on
  (seed, i, image_size, num_objects) only, not on num.
  """
  if not isinstance(num, (int, np.integer)) or num < 0:
    raise ValueError(f"num={num!r}: expected a non-negative int.")
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed={seed!r}: expected a non-negative int.")
  image_size = _check_image_size(image_size)
  counts = _check_num_objects(num_objects)
  images = np.empty((num, image_size, image_size, 3), np.uint8)
  captions, scenes = [], []
  for i in range(num):
    rng = np.random.default_rng([int(seed), i])
    scene = scene_from_rng(rng, counts)
    templates = TEMPLATES[len(scene.objects)]
    captions.append(caption(scene, int(rng.integers(len(templates)))))
    scenes.append(scene)
    images[i] = render(scene, image_size)
  return images, captions, scenes


# ---------------------------------------------------------------------------
# Rendering.


def _inside(shape: str, x: np.ndarray, y: np.ndarray) -> np.ndarray:
  """Whether points (x, y) lie inside `shape` (bool, broadcast of x and y).

  Coordinates are local: the shape is centred at 0 and fits [-1, 1]^2,
  y points down.
  """
  if shape == "circle":
    return x * x + y * y <= 1.0
  if shape == "square":
    return (np.abs(x) <= 0.82) & (np.abs(y) <= 0.82)
  if shape == "diamond":
    return np.abs(x) + np.abs(y) <= 1.0
  if shape == "cross":
    ax, ay = np.abs(x), np.abs(y)
    return (((ax <= 0.32) & (ay <= 0.95)) | ((ay <= 0.32) & (ax <= 0.95)))
  if shape == "triangle":
    # Apex (0, -0.9), base y = 0.85 with half-width 1.
    top, base = -0.9, 0.85
    return (y <= base) & (np.abs(x) <= (y - top) / (base - top))
  if shape == "star":
    # Five points, the first up. Fold the angle into [0, pi/5] and test
    # against the edge from the outer vertex (1, 0) to the inner vertex.
    y = y - 0.1  # centres the star's bounding box: points at y = -0.9, 0.91
    radius = np.sqrt(x * x + y * y)
    sector = 2 * np.pi / 5
    angle = np.mod(np.arctan2(x, -y), sector)
    angle = np.minimum(angle, sector - angle)
    px, py = radius * np.cos(angle), radius * np.sin(angle)
    inner = 0.5
    bx, by = inner * np.cos(np.pi / 5), inner * np.sin(np.pi / 5)
    return (bx - 1.0) * py - by * (px - 1.0) >= 0.0
  raise ValueError(f"Unknown shape {shape!r}; expected one of {SHAPES}.")


def _supersampling(image_size: int) -> int:
  """Samples per pixel side: 256+ across the canvas, at least 2 per pixel.

  Up to 256 pixels this samples every size on the same 256-point grid, so a
  box-downsampled large render equals a small one up to rounding.
  """
  return max(2, -(-256 // image_size))


def object_center(obj: Object) -> tuple[float, float]:
  """The object's centre (x, y) in [0, 1]^2 canvas coordinates."""
  row, col = obj.cell
  return ((col + 0.5 + obj.offset[0]) / GRID,
          (row + 0.5 + obj.offset[1]) / GRID)


def object_coverage(obj: Object, image_size: int
                    ) -> tuple[np.ndarray, tuple[slice, slice]]:
  """Antialiased coverage of `obj` on a canvas of `image_size` pixels.

  Returns (alpha float32 [h, w] in [0, 1], (rows, cols) slices): the
  coverage of the pixels of the object's bounding box.
  """
  size, ss = image_size, _supersampling(image_size)
  cx, cy = object_center(obj)
  half = SIZE_HALF_EXTENT[obj.size] / GRID  # canvas units
  x0, y0 = (max(0, int(np.floor((c - half) * size)) - 1) for c in (cx, cy))
  x1, y1 = (min(size, int(np.ceil((c + half) * size)) + 1) for c in (cx, cy))
  xs = (np.arange(x0 * ss, x1 * ss, dtype=np.float32) + 0.5) / (size * ss)
  ys = (np.arange(y0 * ss, y1 * ss, dtype=np.float32) + 0.5) / (size * ss)
  inside = _inside(obj.shape, ((xs - cx) / half)[None, :],
                   ((ys - cy) / half)[:, None])  # [h * ss, w * ss]
  h, w = y1 - y0, x1 - x0
  alpha = inside.reshape(h, ss, w, ss).mean(axis=(1, 3), dtype=np.float32)
  return alpha, (slice(y0, y1), slice(x0, x1))


def object_box(obj: Object, image_size: int = 32) -> np.ndarray:
  """The box of the pixels `render` draws `obj` on, at `image_size`.

  Returns float32 [4] (x0, y0, x1, y1): pixel edges, x to the right and y
  down, so the drawn pixels (coverage > 0 in `object_coverage`, the
  renderer's own supersampled geometry) are columns x0..x1-1 and rows
  y0..y1-1, and the box is the tightest pixel-aligned one holding them.
  """
  image_size = _check_image_size(image_size)
  alpha, (rows, cols) = object_coverage(obj, image_size)
  drawn_cols = np.flatnonzero(alpha.max(axis=0) > 0)
  drawn_rows = np.flatnonzero(alpha.max(axis=1) > 0)
  return np.array([cols.start + drawn_cols[0], rows.start + drawn_rows[0],
                   cols.start + drawn_cols[-1] + 1,
                   rows.start + drawn_rows[-1] + 1], np.float32)


def object_boxes(scene: Scene, image_size: int = 32) -> np.ndarray:
  """float32 [n, 4]: `object_box` of each of the scene's objects, in order.

  Together they hold every pixel `render(scene, image_size)` draws an
  object on (objects stay inside their cells and never overlap).
  """
  return np.stack([object_box(obj, image_size) for obj in scene.objects])


def caption_words() -> set[str]:
  """Every word a caption can hold (its templates, phrases and attribute
  values): what a text tokenizer trained on captions covers."""
  words = set(COLORS) | set(SHAPES) | set(SIZES) | {"a", "an"}
  for phrase in (list(LOCATION_PHRASES.values())
                 + list(RELATION_PHRASES.values())):
    words |= set(phrase.split())
  for templates in TEMPLATES.values():
    for template in templates:
      words |= set(re.sub(r"\{\w+\}|,", " ", template).split())
  return words


@dataclasses.dataclass(frozen=True)
class ObjectRef:
  """How a text names an object of a scene: "the [color] shape" (edit
  instructions, questions, grounded phrases)."""
  shape: str
  color: str | None = None

  def __post_init__(self):
    if self.shape not in SHAPES:
      raise ValueError(f"Unknown shape {self.shape!r}; expected one of "
                       f"{SHAPES}.")
    if self.color is not None and self.color not in COLORS:
      raise ValueError(f"Unknown color {self.color!r}; expected one of "
                       f"{COLORS}.")

  def matches(self, obj: Object) -> bool:
    return obj.shape == self.shape and self.color in (None, obj.color)


def object_ref(scene: Scene, index: int) -> ObjectRef | None:
  """The shortest unambiguous name of scene.objects[index]: None ("it")
  alone, the shape if the shapes differ, else colour and shape."""
  if len(scene.objects) == 1:
    return None
  obj, other = scene.objects[index], scene.objects[1 - index]
  return ObjectRef(obj.shape, obj.color if obj.shape == other.shape else None)


@functools.lru_cache(maxsize=64)
def _background(style: int, image_size: int) -> np.ndarray:
  """float32 [S, S, 3], read-only: the background, sampled at pixel centres
  (linear gradients, so a box-downsampled render matches a smaller one)."""
  _, start, end, direction = BACKGROUNDS[style]
  centers = (np.arange(image_size, dtype=np.float32) + 0.5) / image_size
  if direction == "vertical":
    t = np.broadcast_to(centers[:, None], (image_size, image_size))
  elif direction == "diagonal":
    t = (centers[:, None] + centers[None, :]) / 2
  else:
    t = np.zeros((image_size, image_size), np.float32)
  start, end = np.float32(start), np.float32(end)
  image = start + (end - start) * t[..., None]  # [S, S, 3]
  image = image.astype(np.float32)
  image.flags.writeable = False
  return image


def render(scene: Scene, image_size: int = 32) -> np.ndarray:
  """The scene as a uint8 [image_size, image_size, 3] image."""
  image_size = _check_image_size(image_size)
  image = _background(scene.background, image_size).copy()  # [S, S, 3]
  for obj in scene.objects:
    alpha, (rows, cols) = object_coverage(obj, image_size)
    color = np.asarray(PALETTE[obj.color], np.float32)
    patch = image[rows, cols]
    image[rows, cols] = patch + alpha[..., None] * (color - patch)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Captions.


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def caption(scene: Scene, template: int | None = None) -> str:
  """A caption of the scene through template `template` of
  TEMPLATES[len(scene.objects)]; None picks one deterministically from the
  scene's attributes."""
  templates = TEMPLATES[len(scene.objects)]
  if template is None:
    key = repr([(o.shape, o.color, o.size, o.cell) for o in scene.objects]
               + [scene.relation])
    template = zlib.crc32(key.encode()) % len(templates)
  if not isinstance(template, (int, np.integer)) or not (
      0 <= template < len(templates)):
    raise ValueError(
        f"template={template!r} is out of range; a {len(scene.objects)}-"
        f"object scene has templates 0..{len(templates) - 1}.")
  text = templates[template]
  fields = {}
  if scene.relation is not None:
    fields["r"] = RELATION_PHRASES[scene.relation]
  for k, obj in enumerate(scene.objects):
    fields[f"z{k}"] = obj.size
    fields[f"c{k}"] = obj.color
    fields[f"s{k}"] = obj.shape
    fields[f"l{k}"] = LOCATION_PHRASES[obj.cell]
    # The article agrees with the word that follows it in this template.
    follows = text.split(f"{{a{k}}} ", 1)[1].split(" ", 1)[0]
    fields[f"a{k}"] = _article(fields[follows.strip("{}")])
  return text.format(**fields)


def complete_caption(scene: Scene) -> str:
  """The caption stating every object's size, colour, shape and cell
  (COMPLETE_TEMPLATES): what to score a whole scene against."""
  return caption(scene, COMPLETE_TEMPLATES[len(scene.objects)])


def _alternatives(words) -> str:
  # Longest first, so "at the top left" wins over "at the top".
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


def _template_regex(template: str) -> re.Pattern[str]:
  groups = {"a": "an?", "z": f"(?P<z{{k}}>{_alternatives(SIZES)})",
            "c": f"(?P<c{{k}}>{_alternatives(COLORS)})",
            "s": f"(?P<s{{k}}>{_alternatives(SHAPES)})",
            "l": f"(?P<l{{k}}>{_alternatives(LOCATION_PHRASES.values())})"}
  pattern = ""
  for literal, field in re.findall(r"([^{]*)(?:\{(\w+)\})?", template):
    pattern += re.escape(literal)
    if not field:
      continue
    if field == "r":
      pattern += f"(?P<r>{_alternatives(RELATION_PHRASES.values())})"
    else:
      pattern += groups[field[0]].replace("{k}", field[1:])
  return re.compile(pattern)


_TEMPLATE_REGEXES = tuple(
    (count, index, _template_regex(text))
    for count, templates in TEMPLATES.items()
    for index, text in enumerate(templates))
_CELL_OF_PHRASE = {phrase: cell for cell, phrase in LOCATION_PHRASES.items()}
_RELATION_OF_PHRASE = {p: r for r, p in RELATION_PHRASES.items()}


def parse_caption(text: str) -> ParsedScene | None:
  """Reads a caption made by `caption` back into attributes, else None.

  Case, surrounding whitespace, repeated spaces and a final period are
  ignored. Sizes, cells and the relation are None where not stated.
  """
  text = " ".join(str(text).lower().split()).rstrip(".").strip()
  for count, index, regex in _TEMPLATE_REGEXES:
    match = regex.fullmatch(text)
    if match is None:
      continue
    found = match.groupdict()
    objects = []
    for k in range(count):
      location = found.get(f"l{k}")
      objects.append(ParsedObject(
          shape=found[f"s{k}"], color=found[f"c{k}"], size=found.get(f"z{k}"),
          cell=_CELL_OF_PHRASE[location] if location else None))
    relation = found.get("r")
    return ParsedScene(tuple(objects),
                       _RELATION_OF_PHRASE[relation] if relation else None,
                       index)
  return None


# ---------------------------------------------------------------------------
# Labels and (de)serialisation.


def cell_index(cell: Sequence[int]) -> int:
  """Cell (row, col) -> row * 3 + col, in 0..8."""
  return int(cell[0]) * GRID + int(cell[1])


def object_labels(scene: Scene, max_objects: int | None = None
                  ) -> dict[str, np.ndarray]:
  """Class indices for a probe classifier.

  Returns int32 arrays "shape", "color", "size", "cell" [n] (indices into
  SHAPES, COLORS, SIZES and the row-major 3x3 cells), padded with -1 to
  `max_objects` when given; "relation" [] (index into RELATIONS, -1 for one
  object) and "num_objects" [].
  """
  n = len(scene.objects)
  length = n if max_objects is None else max_objects
  if length < n:
    raise ValueError(f"max_objects={max_objects} is below the scene's {n} "
                     "objects; expected max_objects >= 2 or None.")
  labels = {name: np.full(length, -1, np.int32)
            for name in ("shape", "color", "size", "cell")}
  for k, obj in enumerate(scene.objects):
    labels["shape"][k] = SHAPES.index(obj.shape)
    labels["color"][k] = COLORS.index(obj.color)
    labels["size"][k] = SIZES.index(obj.size)
    labels["cell"][k] = cell_index(obj.cell)
  labels["relation"] = np.asarray(
      -1 if scene.relation is None else RELATIONS.index(scene.relation),
      np.int32)
  labels["num_objects"] = np.asarray(n, np.int32)
  return labels


def scene_from_dict(data: Mapping[str, Any]) -> Scene:
  """Inverse of `dataclasses.asdict(scene)` (also after a JSON round trip)."""
  objects = tuple(
      Object(o["shape"], o["color"], o["size"], tuple(o["cell"]),
             tuple(o.get("offset", (0.0, 0.0))))
      for o in data["objects"])
  return Scene(objects, data.get("relation"), int(data.get("background", 0)))


def scene_from_json(text: str | bytes) -> Scene:
  """A Scene from the JSON stored in the unimm_shapes "scene" feature."""
  return scene_from_dict(json.loads(text))
