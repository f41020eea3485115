r"""Interleaved text+image documents, tokenized and packed: generated from
the shapes world, or made of a converted data set's (image, caption) pairs.

A document is a list of segments, each a text or a scene (an image to be
rendered), plus its ground truth. Four kinds:

  caption_image   [caption, scene]            text-to-image
  image_caption   [scene, CAPTION_PROMPT, caption]
                                              image-to-text
  edit            [scene0, instruction1, scene1, ..., instructionK, sceneK]
                  with K = 1..3 edits, each legal for the scene it edits
  question        [scene, question, one-word answer]   (not in the default
                  mix; unimm.data.questions, --kinds ...,question)
  refer           [scene, "where is the blue square?", box] (Kosmos-2
                  grounding, unimm.data.grounding: the box is two location
                  ids on a grid of `bins` (grounding.DEFAULT_BINS) cells a
                  side; ABSENT_RATE of them
                  name an object the scene lacks and get
                  "there is no blue square in this image"; not in the
                  default mix)
  grounded_caption
                  [scene, GROUNDED_PROMPT, "a big red star", box, "to the
                  left of", "a small blue square", box] (Kosmos-2's grounded
                  captions: each object's noun phrase followed by its box;
                  the words alone are the caption; not in the default mix)
  draw_box        ["draw a red star in", box, "and a blue square in", box,
                  scene] (drawing in given boxes; not in the default mix)

An image at the start of a document goes on with a caption or with an edit
instruction, so a captioning request is stated: image-to-text documents put
the text CAPTION_PROMPT between the image and its caption, and
api.InterleavedModel.caption() writes it after the image it is given.

`make_document(seed, index)` depends only on (seed, index, kinds, weights):
np.random.default_rng([seed, index, 0x1EAF]) draws it.

Edit instructions follow a small regular grammar (`parse_instruction` reads
it, `instruction` writes it, `apply_edit` applies an Edit):

  ref      := "it"                   (one-object scenes)
            | "the" [COLOR] SHAPE    (two objects: COLOR only when both
                                      objects share the shape)
  move     := "move" ref ("to the left" | "to the right" | "up" | "down")
  recolor  := "make" ref COLOR
  resize   := "make" ref SIZE
  reshape  := "turn" ref "into" ("a" | "an") SHAPE
  add      := "add" ("a" | "an") SIZE COLOR SHAPE
              ("to the left of" | "to the right of" | "above" | "below") "it"
  remove   := "remove" "the" [COLOR] SHAPE

e.g. "move it to the right", "make the circle blue", "turn the red square
into a star", "add a small green triangle below it", "remove the circle".
Edits keep every scene valid (shapes.Scene) and referable: a move goes one
cell within the grid, to a free cell, keeping the scene's relation true
and the dominant direction; "add" puts the new object in the adjacent
cell in the stated direction (one-object scenes only) as the second object;
two objects never share both shape and colour. At each step an operation is
drawn uniformly among those with a legal edit, then an edit uniformly
among that operation's legal edits.

Tokens: `tokenize_documents` maps documents to joint ids
(unimm.models.vocab.VocabLayout): [BOS] + text ids | [BOI, codes, EOI] per
segment + [EOS], calling `image_ids_fn` once per batch of documents.

Packing: `pack` puts documents into rows of `length` tokens (greedy
first-fit, in order) with segment ids (1, 2, ... per document in the row,
0 = padding) and positions restarting at 0 per document. The model attends
only within one non-zero segment, causally
(unimm.nn.transformer.attention_mask(segment_ids, segment_ids, positions,
positions, causal=True)), so no token sees another document, and RoPE sees
each document's own positions. `loss_mask` marks prediction targets: tokens
that are neither padding nor a document's first token (BOS), so with logits
at t predicting token t + 1 the loss uses loss_mask[:, 1:]; this also drops
the pair (last token of a document, BOS of the next).

Pre-tokenize (one ArrayRecord record per packed row, SPLIT.json metadata):

  python -m unimm.tools.pack_interleaved \
      --tokenizer_workdir WORKDIRS/tokenizer \
      --text_tokenizer WORKDIRS/spiece.model --out WORKDIRS/interleaved \
      --split train --num_documents 100000 --length 512

(unimm/tools/pack_interleaved.py: `write_interleaved(tokenizer, ...)` with
the tokenizer that workdir holds), and read batches with
`packed_dataset(out_dir, split, batch_size=...)`.
Own data: `write_pairs(tokenizer, spiece, out_dir, split, source=DIR,
length=...)` (the same CLI with --source DIR) packs each pair of a
converted data set as a caption_image and an image_caption document (no
edit stories: those need the shapes world's ground truth); their rows and
metadata are the same format, with the data set's path as "source".
The text tokenizer should be trained on these documents' texts (captions
and instructions: `document_texts`); unknown pieces are counted in the
metadata.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import re
import zlib
from collections.abc import Callable, Sequence
from typing import Any

from absl import logging
from etils import epath
from flax import serialization
import numpy as np

from unimm import paths
from unimm.data import convert
from unimm.data import grounding
from unimm.data import pipeline
from unimm.data import pretokenize
from unimm.data import questions as questions_lib
from unimm.data import shapes
from unimm.evaluation.reports import write_report
from unimm.models import image_input as image_input_lib
from unimm.models import vocab as vocab_lib
from unimm.progress import Progress
from unimm.tokenizers import text as text_lib

KINDS = ("caption_image", "image_caption", "edit", "question", "refer",
         "grounded_caption", "draw_box")
# Kinds whose documents hold location ids (a layout with location_bins).
GROUNDED_KINDS = ("refer", "grounded_caption", "draw_box")
# The share of referring documents that name an object the scene lacks
# (answered in words: grounding.NOT_FOUND_ANSWER).
ABSENT_RATE = 0.2
# The mix written unless --kinds says otherwise.
DEFAULT_KINDS = ("caption_image", "image_caption", "edit")
# The kinds a converted data set's (image, caption) pairs make (write_pairs).
PAIR_KINDS = ("caption_image", "image_caption")
EDIT_OPS = ("move", "recolor", "reshape", "resize", "add", "remove")
MAX_EDITS = 3
# Move direction -> (d_row, d_col) and its phrase.
DIRECTIONS = {"left": (0, -1), "right": (0, 1), "up": (-1, 0),
              "down": (1, 0)}
DIRECTION_PHRASES = {"left": "to the left", "right": "to the right",
                     "up": "up", "down": "down"}
# The new object's relation to the existing one -> the new cell's offset.
ADD_OFFSETS = {"left of": (0, -1), "right of": (0, 1), "above": (-1, 0),
               "below": (1, 0)}
INVERSE_RELATIONS = {"left of": "right of", "right of": "left of",
                     "above": "below", "below": "above"}
IMAGE_SIZE = 32
# The words that ask for a caption (see the module doc); v2 of FORMAT.
CAPTION_PROMPT = "describe the image"
# The words that ask for a grounded caption (Kosmos-2's <grounding>). No
# request is the start of another (CAPTION_PROMPT, this, the questions):
# after "describe the image" a model trained on "describe the image with
# boxes" would go on with "with boxes" as often as with a caption.
GROUNDED_PROMPT = "locate the objects"
FORMAT = ("unimm_interleaved/v2 (msgpack: tokens, segment_ids int32 [L], "
          "documents int32 [k])")
SPLIT_SEEDS = {"train": 0, "validation": 1, "test": 2}
_RNG_TAG = 0x1EAF  # keeps documents apart from shapes.generate's examples


# ---------------------------------------------------------------------------
# Edits.


def _check_choice(setting: str, value: Any, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"Unknown {setting} {value!r}; expected one of "
                     f"{tuple(choices)}.")


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


# How instructions, questions and grounded texts name an object.
ObjectRef = shapes.ObjectRef
object_ref = shapes.object_ref


# Which Edit fields each operation needs.
_OP_FIELDS = {"move": ("direction",), "recolor": ("color",),
              "reshape": ("shape",), "resize": ("size",),
              "add": ("shape", "color", "size", "relation"), "remove": ()}


@dataclasses.dataclass(frozen=True)
class Edit:
  """One edit, as its instruction states it.

  target: the object acted on; None means "it" (the only object). For
  "add" it is None and shape/color/size/relation describe the new object
  (relation: the new object's relation to the existing one). `offset` is
  the new object's jitter inside its cell (not said in the instruction,
  not compared).
  """
  op: str
  target: ObjectRef | None = None
  direction: str | None = None
  color: str | None = None
  shape: str | None = None
  size: str | None = None
  relation: str | None = None
  offset: tuple[float, float] = dataclasses.field(default=(0.0, 0.0),
                                                  compare=False)

  def __post_init__(self):
    _check_choice("edit op", self.op, EDIT_OPS)
    choices = {"direction": tuple(DIRECTIONS), "color": shapes.COLORS,
               "shape": shapes.SHAPES, "size": shapes.SIZES,
               "relation": shapes.RELATIONS}
    for name, allowed in choices.items():
      value = getattr(self, name)
      if name in _OP_FIELDS[self.op]:
        _check_choice(f"{self.op} {name}", value, allowed)
      elif value is not None:
        raise ValueError(f"A {self.op!r} edit has no {name}; got {value!r}.")
    if self.op == "add" and self.target is not None:
      raise ValueError(f"An 'add' edit places the new object relative to "
                       f"'it' (target None); got target {self.target!r}.")
    if self.op == "remove" and self.target is None:
      raise ValueError("A 'remove' edit names its object (two-object scenes "
                       "only); got target None ('it').")


def _ref_text(ref: ObjectRef | None) -> str:
  if ref is None:
    return "it"
  return f"the {ref.color} {ref.shape}" if ref.color else f"the {ref.shape}"


def instruction(edit: Edit) -> str:
  """The instruction text of an edit (the grammar in the module doc)."""
  ref = _ref_text(edit.target)
  if edit.op == "move":
    return f"move {ref} {DIRECTION_PHRASES[edit.direction]}"
  if edit.op == "recolor":
    return f"make {ref} {edit.color}"
  if edit.op == "resize":
    return f"make {ref} {edit.size}"
  if edit.op == "reshape":
    return f"turn {ref} into {_article(edit.shape)} {edit.shape}"
  if edit.op == "add":
    return (f"add {_article(edit.size)} {edit.size} {edit.color} "
            f"{edit.shape} {shapes.RELATION_PHRASES[edit.relation]} it")
  return f"remove {ref}"


def _words(words) -> str:
  # Longest first, so "to the left of" wins over "to the left".
  return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_REF = (rf"(?:it|the (?:(?P<ref_color>{_words(shapes.COLORS)}) )?"
        rf"(?P<ref_shape>{_words(shapes.SHAPES)}))")
_INSTRUCTIONS = tuple((op, re.compile(pattern)) for op, pattern in (
    ("move", rf"move {_REF} "
             rf"(?P<direction>{_words(DIRECTION_PHRASES.values())})"),
    ("recolor", rf"make {_REF} (?P<color>{_words(shapes.COLORS)})"),
    ("resize", rf"make {_REF} (?P<size>{_words(shapes.SIZES)})"),
    ("reshape", rf"turn {_REF} into an? (?P<shape>{_words(shapes.SHAPES)})"),
    ("add", rf"add an? (?P<size>{_words(shapes.SIZES)}) "
            rf"(?P<color>{_words(shapes.COLORS)}) "
            rf"(?P<shape>{_words(shapes.SHAPES)}) "
            rf"(?P<relation>{_words(shapes.RELATION_PHRASES.values())}) it"),
    ("remove", rf"remove {_REF}"),
))
_DIRECTION_OF_PHRASE = {p: d for d, p in DIRECTION_PHRASES.items()}
_RELATION_OF_PHRASE = {p: r for r, p in shapes.RELATION_PHRASES.items()}


def parse_instruction(text: str) -> Edit:
  """Reads an instruction back into an Edit (offset (0, 0)).

  Case, surrounding whitespace, repeated spaces and a final period are
  ignored. Raises ValueError for text outside the grammar.
  """
  normal = " ".join(str(text).lower().split()).rstrip(".").strip()
  for op, regex in _INSTRUCTIONS:
    match = regex.fullmatch(normal)
    if match is None:
      continue
    found = match.groupdict()
    target = (ObjectRef(found["ref_shape"], found["ref_color"])
              if found.get("ref_shape") else None)
    if op == "remove" and target is None:
      break  # "remove it" is outside the grammar.
    fields = {"direction": _DIRECTION_OF_PHRASE.get(found.get("direction")),
              "relation": _RELATION_OF_PHRASE.get(found.get("relation"))}
    fields.update({k: found.get(k) for k in ("color", "shape", "size")})
    return Edit(op, target, **{k: v for k, v in fields.items()
                               if k in _OP_FIELDS[op]})
  raise ValueError(
      f"Cannot parse edit instruction {text!r}; expected e.g. 'move it to "
      "the left', 'make the circle blue', 'make it small', 'turn it into a "
      "star', 'add a big red square below it' or 'remove the circle' (see "
      "unimm.data.interleaved's grammar).")


def _in_grid(cell: tuple[int, int]) -> bool:
  return 0 <= cell[0] < shapes.GRID and 0 <= cell[1] < shapes.GRID


def _dominant(relation: str, cell0, cell1) -> bool:
  """relation holds along the axis of larger separation (as the relations
  of shapes.scene_from_rng do)."""
  d_row, d_col = abs(cell0[0] - cell1[0]), abs(cell0[1] - cell1[1])
  major, minor = ((d_col, d_row) if relation in ("left of", "right of")
                  else (d_row, d_col))
  return shapes.relation_holds(relation, cell0, cell1) and minor < major


def _step(cell, delta) -> tuple[int, int]:
  return (cell[0] + delta[0], cell[1] + delta[1])


def _resolve(scene: shapes.Scene, ref: ObjectRef | None, text: str) -> int:
  if ref is None:
    if len(scene.objects) != 1:
      raise ValueError(f"{text!r} says 'it' but the scene has two objects; "
                       "name the object ('the [color] shape').")
    return 0
  found = [k for k, obj in enumerate(scene.objects) if ref.matches(obj)]
  if len(found) != 1:
    have = [f"{o.color} {o.shape}" for o in scene.objects]
    raise ValueError(
        f"{text!r} names {'no' if not found else 'more than one'} object in "
        f"a scene with {have}; name exactly one ('the [color] shape').")
  return found[0]


def apply_edit(scene: shapes.Scene, edit: Edit) -> shapes.Scene:
  """The scene after `edit`; ValueError if the edit is not legal for it.

  Offsets are kept (clipped to a resized object's limit); the background
  never changes; an added object becomes the second object.
  """
  text = instruction(edit)
  objects = list(scene.objects)
  if edit.op == "add":
    if len(objects) != 1:
      raise ValueError(f"{text!r}: 'add' needs a one-object scene; this one "
                       "has two.")
    (obj,) = objects
    cell = _step(obj.cell, ADD_OFFSETS[edit.relation])
    if not _in_grid(cell):
      raise ValueError(f"{text!r}: there is no cell {edit.relation} "
                       f"{obj.cell} in the {shapes.GRID}x{shapes.GRID} grid.")
    if (edit.shape, edit.color) == (obj.shape, obj.color):
      raise ValueError(f"{text!r}: the new object must differ from the "
                       "existing one in shape or colour.")
    new = shapes.Object(edit.shape, edit.color, edit.size, cell, edit.offset)
    return shapes.Scene((obj, new), INVERSE_RELATIONS[edit.relation],
                        scene.background)
  k = _resolve(scene, edit.target, text)
  obj = objects[k]
  if edit.op == "remove":
    if len(objects) != 2:
      raise ValueError(f"{text!r}: 'remove' needs a two-object scene.")
    return shapes.Scene((objects[1 - k],), None, scene.background)
  if edit.op == "move":
    cell = _step(obj.cell, DIRECTIONS[edit.direction])
    if not _in_grid(cell):
      raise ValueError(f"{text!r}: cell {obj.cell} has no neighbour "
                       f"{edit.direction} in the grid.")
    new = dataclasses.replace(obj, cell=cell)
  elif edit.op == "recolor":
    if edit.color == obj.color:
      raise ValueError(f"{text!r}: the object is {obj.color} already.")
    new = dataclasses.replace(obj, color=edit.color)
  elif edit.op == "reshape":
    if edit.shape == obj.shape:
      raise ValueError(f"{text!r}: the object is a {obj.shape} already.")
    new = dataclasses.replace(obj, shape=edit.shape)
  else:  # resize
    if edit.size == obj.size:
      raise ValueError(f"{text!r}: the object is {obj.size} already.")
    limit = shapes.SIZE_MAX_OFFSET[edit.size]
    offset = tuple(float(np.clip(v, -limit, limit)) for v in obj.offset)
    new = dataclasses.replace(obj, size=edit.size, offset=offset)
  objects[k] = new
  if len(objects) == 2:
    other = objects[1 - k]
    if (new.shape, new.color) == (other.shape, other.color):
      raise ValueError(f"{text!r} would make both objects {new.color} "
                       f"{new.shape}s, which no instruction could tell apart.")
    if edit.op == "move" and not _dominant(
        scene.relation, objects[0].cell, objects[1].cell):
      raise ValueError(
          f"{text!r} would break the scene's relation {scene.relation!r} "
          f"(cells {objects[0].cell}, {objects[1].cell}): moves keep it "
          "true along the axis of larger separation.")
  return shapes.Scene(tuple(objects), scene.relation, scene.background)


def legal_edits(scene: shapes.Scene) -> dict[str, list[Edit]]:
  """Every legal edit of `scene` by operation (offsets (0, 0)), each naming
  its object by `object_ref`. Operations without one are left out."""
  edits: dict[str, list[Edit]] = collections.defaultdict(list)
  objects = scene.objects
  for k, obj in enumerate(objects):
    ref = object_ref(scene, k)
    other = objects[1 - k] if len(objects) == 2 else None
    clash = lambda shape, color: (  # noqa: E731
        other is not None and (shape, color) == (other.shape, other.color))
    for direction, delta in DIRECTIONS.items():
      cell = _step(obj.cell, delta)
      if not _in_grid(cell):
        continue
      if other is not None:
        cells = (cell, other.cell) if k == 0 else (other.cell, cell)
        if not _dominant(scene.relation, *cells):
          continue
      edits["move"].append(Edit("move", ref, direction=direction))
    edits["recolor"] += [Edit("recolor", ref, color=c) for c in shapes.COLORS
                         if c != obj.color and not clash(obj.shape, c)]
    edits["reshape"] += [Edit("reshape", ref, shape=s) for s in shapes.SHAPES
                         if s != obj.shape and not clash(s, obj.color)]
    edits["resize"] += [Edit("resize", ref, size=z) for z in shapes.SIZES
                        if z != obj.size]
    if other is not None:
      edits["remove"].append(Edit("remove", ref))
  if len(objects) == 1:
    (obj,) = objects
    for relation, delta in ADD_OFFSETS.items():
      if not _in_grid(_step(obj.cell, delta)):
        continue
      edits["add"] += [
          Edit("add", None, shape=s, color=c, size=z, relation=relation)
          for s in shapes.SHAPES for c in shapes.COLORS for z in shapes.SIZES
          if (s, c) != (obj.shape, obj.color)]
  return {op: edits[op] for op in EDIT_OPS if edits[op]}


def random_edit(scene: shapes.Scene, rng: np.random.Generator) -> Edit:
  """An operation uniformly among those with a legal edit, then one of its
  legal edits uniformly; an added object gets a random offset."""
  edits = legal_edits(scene)
  ops = list(edits)
  candidates = edits[ops[rng.integers(len(ops))]]
  edit = candidates[rng.integers(len(candidates))]
  if edit.op == "add":
    limit = shapes.SIZE_MAX_OFFSET[edit.size]
    offset = tuple(round(float(v), 4) for v in rng.uniform(-limit, limit, 2))
    edit = dataclasses.replace(edit, offset=offset)
  return edit


def edit_pair(example: dict[str, Any], *, seed: int,
              image_size: int) -> dict[str, Any]:
  """A shapes example (pipeline.parse_image_text's, with "scene") -> an
  edit pair for SEED-X's editing decoder: {"source": the scene rendered,
  "image": the scene after one random_edit, "instruction": its words,
  "caption": the edited scene's, stating every attribute}.
  The edit is drawn from np.random.default_rng([seed, _RNG_TAG,
  crc32(scene)]), so
  an example always gives the same pair (and resumed data the same
  batches)."""
  if "scene" not in example:
    raise ValueError("Edit pairs need the shapes world's scenes (an example "
                     "without 'scene'); train the source-image decoder on "
                     "config.data.source=shapes.")
  text = example["scene"]
  scene = shapes.scene_from_json(text)
  key = zlib.crc32(text.encode("utf-8") if isinstance(text, str) else text)
  edit = random_edit(scene, np.random.default_rng([seed, _RNG_TAG, key]))
  edited = apply_edit(scene, edit)
  return {"source": shapes.render(scene, image_size),
          "image": shapes.render(edited, image_size),
          "instruction": instruction(edit),
          "caption": shapes.complete_caption(edited)}


# ---------------------------------------------------------------------------
# Documents.


@dataclasses.dataclass(frozen=True)
class Document:
  """One interleaved document and its ground truth.

  segments: texts and scenes (images to render) in order. scenes: the
  scenes in order; caption: the caption (caption kinds, else None); edits
  and instructions: the edit story (edit kind, else empty), instructions[i]
  turning scenes[i] into scenes[i + 1]; question and answer (question
  and refer kinds, else None; a refer answer is a grounding.BoxTokens, or
  the not-found text; a grounded_caption's answer is its grounded
  segments, grounding.Phrase and BoxTokens included).
  """
  kind: str
  segments: list[str | shapes.Scene]
  scenes: tuple[shapes.Scene, ...]
  caption: str | None
  edits: tuple[Edit, ...]
  instructions: tuple[str, ...]
  seed: int
  index: int
  question: str | None = None
  answer: Any = None

  @property
  def texts(self) -> list[str]:
    return [s for s in self.segments if isinstance(s, str)]


def _check_kinds(kinds: Sequence[str], weights: Sequence[float] | None
                 ) -> tuple[tuple[str, ...], np.ndarray]:
  kinds = tuple(kinds)
  if not kinds or any(k not in KINDS for k in kinds):
    raise ValueError(f"kinds={kinds!r}; expected a non-empty subset of "
                     f"{KINDS} (--kinds).")
  if weights is None:
    return kinds, np.full(len(kinds), 1.0 / len(kinds))
  p = np.asarray(weights, np.float64)
  if p.shape != (len(kinds),) or (p < 0).any() or p.sum() <= 0:
    raise ValueError(f"weights={tuple(weights)!r} for kinds {kinds}; expected "
                     f"{len(kinds)} non-negative weights with a positive sum "
                     "(--weights).")
  return kinds, p / p.sum()


def make_document(seed: int, index: int,
                  kinds: Sequence[str] = DEFAULT_KINDS,
                  weights: Sequence[float] | None = None,
                  bins: int = grounding.DEFAULT_BINS) -> Document:
  """Document `index` of the stream `seed` (kinds drawn with `weights`,
  uniform by default). Depends only on (seed, index, kinds, weights);
  `bins` (cells a side of the location grid) sets only the boxes of the
  grounded kinds, which name the same objects whatever it is."""
  kinds, p = _check_kinds(kinds, weights)
  bins = grounding.check_bins(bins)
  if (not isinstance(seed, (int, np.integer)) or seed < 0
      or not isinstance(index, (int, np.integer)) or index < 0):
    raise ValueError(f"seed={seed!r}, index={index!r}; expected non-negative "
                     "ints.")
  rng = np.random.default_rng([int(seed), int(index), _RNG_TAG])
  kind = kinds[int(rng.choice(len(kinds), p=p))]
  scene = shapes.scene_from_rng(rng)
  if kind == "question":
    question, answer = questions_lib.random_question(scene, rng)
    return Document(kind, [scene, question, answer], (scene,), None, (), (),
                    int(seed), int(index), question, answer)
  if kind == "refer":
    if rng.random() < ABSENT_RATE:
      phrase = grounding.absent_phrase(scene, rng)
      question = grounding.WHERE_QUESTION.format(phrase)
      answer = grounding.where_answer(scene, phrase, IMAGE_SIZE, bins)[0]
    else:
      question, (answer,) = grounding.referring_expression(
          scene, int(rng.integers(len(scene.objects))), IMAGE_SIZE, bins)
    return Document(kind, [scene, question, answer], (scene,), None, (), (),
                    int(seed), int(index), question, answer)
  if kind == "draw_box":
    request = _flat(grounding.draw_request(scene, IMAGE_SIZE, bins))
    return Document(kind, [*request, scene], (scene,), None, (), (),
                    int(seed), int(index))
  if kind == "grounded_caption":
    templates = shapes.TEMPLATES[len(scene.objects)]
    grounded = grounding.grounded_caption(
        scene, IMAGE_SIZE, bins, template=int(rng.integers(len(templates))))
    return Document(kind, [scene, GROUNDED_PROMPT, *_flat(grounded)],
                    (scene,), grounding.plain_text(grounded), (), (),
                    int(seed), int(index), answer=grounded)
  if kind in ("caption_image", "image_caption"):
    templates = shapes.TEMPLATES[len(scene.objects)]
    text = shapes.caption(scene, int(rng.integers(len(templates))))
    segments = ([text, scene] if kind == "caption_image"
                else [scene, CAPTION_PROMPT, text])
    return Document(kind, segments, (scene,), text, (), (), int(seed),
                    int(index))
  scenes, edits, texts = [scene], [], []
  segments: list[str | shapes.Scene] = [scene]
  for _ in range(int(rng.integers(1, MAX_EDITS + 1))):
    edit = random_edit(scenes[-1], rng)
    scenes.append(apply_edit(scenes[-1], edit))
    edits.append(edit)
    texts.append(instruction(edit))
    segments += [texts[-1], scenes[-1]]
  return Document(kind, segments, tuple(scenes), None, tuple(edits),
                  tuple(texts), int(seed), int(index))


def _flat(segments: Sequence[grounding.Segment]) -> list[Any]:
  """Grounded segments as document segments: a Phrase becomes its words
  (no markers: the box after a phrase grounds it), a box stays a box."""
  return [s.text if isinstance(s, grounding.Phrase) else s for s in segments]


def document_texts(num_documents: int, seed: int = 0,
                   kinds: Sequence[str] = DEFAULT_KINDS,
                   weights: Sequence[float] | None = None) -> list[str]:
  """The texts (captions, instructions) of documents 0..N-1: a corpus for
  training the text tokenizer (unimm.tokenizers.text.train_sentencepiece)."""
  return [text for i in range(num_documents)
          for text in make_document(seed, i, kinds, weights).texts]


# ---------------------------------------------------------------------------
# Tokens.


ImageIdsFn = Callable[[np.ndarray], np.ndarray]


def tokenize_documents(documents: Sequence[Document], text_tokenizer,
                       image_ids_fn: ImageIdsFn,
                       layout: vocab_lib.VocabLayout,
                       image_size: int = IMAGE_SIZE) -> list[np.ndarray]:
  """Documents -> joint ids, each int32 [L_i]: [BOS] + per segment (text ids
  without EOS | image_span(codes)) + [EOS].

  image_ids_fn(uint8 [N, S, S, 3]) -> int [N, h, w] is called once, on every
  scene of the batch rendered at image_size.
  """
  return tokenize_documents_and_reads(documents, text_tokenizer,
                                      image_ids_fn, layout, image_size)[0]


def tokenize_documents_and_reads(
    documents: Sequence[Document], text_tokenizer, image_ids_fn: ImageIdsFn,
    layout: vocab_lib.VocabLayout, image_size: int = IMAGE_SIZE,
    image_input=None) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """tokenize_documents with an image-input setting that reads the image
  opening each document (vocab.encode_documents_and_reads): (tokens,
  reads), reads[i] uint8 [R_i, p*p*3]."""
  if text_tokenizer.vocab_size > layout.text_vocab_size:
    raise ValueError(
        f"The text tokenizer has {text_tokenizer.vocab_size} ids but the "
        f"layout holds {layout.text_vocab_size}; build the layout from the "
        "tokenizer (VocabLayout(text_tokenizer.vocab_size, num_codes)).")
  rendered = [[shapes.render(s, image_size)
                if isinstance(s, shapes.Scene) else s
                for s in d.segments] for d in documents]
  return vocab_lib.encode_documents_and_reads(
      rendered, layout, text_tokenizer.pieces, image_ids_fn,
      image_input=image_input)


def tokenize_document(document: Document, text_tokenizer,
                      image_ids_fn: ImageIdsFn,
                      layout: vocab_lib.VocabLayout,
                      image_size: int = IMAGE_SIZE) -> np.ndarray:
  """One document -> joint ids int32 [L] (see tokenize_documents)."""
  return tokenize_documents([document], text_tokenizer, image_ids_fn,
                            layout, image_size)[0]


# ---------------------------------------------------------------------------
# Packing.


def packed_features(segment_ids, xp=np) -> dict[str, Any]:
  """positions and loss_mask (int32 [N, L]) of packed rows' segment_ids.

  xp: the array module, numpy (data pipeline) or jax.numpy (inside a
  compiled step, e.g. after interleaved_task.drop_text compacts rows).
  """
  segment_ids = xp.asarray(segment_ids)
  n, length = segment_ids.shape
  slots = xp.broadcast_to(xp.arange(length, dtype=np.int32), (n, length))
  starts = xp.concatenate([xp.ones((n, 1), bool),
                           segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
  first = xp.maximum.accumulate(xp.where(starts, slots, 0), axis=1)
  real = segment_ids != 0
  positions = xp.where(real, slots - first, 0).astype(np.int32)
  return {"positions": positions,
          "loss_mask": (real & (positions > 0)).astype(np.int32)}


def _first_fit(lengths: Sequence[int], length: int) -> list[list[int]]:
  """Rows of document indices: each document in turn goes into the first
  row with room, else a new row."""
  free = np.zeros(len(lengths), np.int64)
  rows: list[list[int]] = []
  for index, n in enumerate(lengths):
    fits = free[:len(rows)] >= n
    row = int(np.argmax(fits)) if fits.any() else len(rows)
    if row == len(rows):
      rows.append([])
      free[row] = length
    rows[row].append(index)
    free[row] -= n
  return rows


def _pack(documents: Sequence[np.ndarray], length: int
          ) -> tuple[dict[str, np.ndarray], list[list[int]]]:
  if not isinstance(length, (int, np.integer)) or length <= 0:
    raise ValueError(f"length={length!r}; expected a positive int "
                     "(config.model.max_len / --length).")
  lengths = [len(d) for d in documents]
  for index, n in enumerate(lengths):
    if n > length:
      raise ValueError(
          f"Document {index} has {n} tokens, more than the context length "
          f"{length}; raise config.model.max_len (--length) to at least {n} "
          "or use shorter documents (fewer edits, smaller image grids).")
    if n == 0:
      raise ValueError(f"Document {index} is empty; expected at least "
                       "[BOS, EOS].")
  rows = _first_fit(lengths, length)
  tokens = np.zeros((len(rows), length), np.int32)  # [N, L], 0 = PAD
  segment_ids = np.zeros((len(rows), length), np.int32)  # [N, L]
  for r, row in enumerate(rows):
    start = 0
    for segment, index in enumerate(row, start=1):
      stop = start + lengths[index]
      tokens[r, start:stop] = documents[index]
      segment_ids[r, start:stop] = segment
      start = stop
  return dict(tokens=tokens, segment_ids=segment_ids,
              **packed_features(segment_ids)), rows


def pack(documents: Sequence[np.ndarray], length: int
         ) -> dict[str, np.ndarray]:
  """Packs documents (joint ids [L_i]) into rows of `length`, greedy
  first-fit in order: each document whole, in the first row with room.

  Returns int32 [N, length] arrays: tokens (PAD-filled), segment_ids (1, 2,
  ... per document in its row, 0 = padding), positions (0.. per document)
  and loss_mask (1 on targets: not padding, not a document's BOS). The
  model attends only within one non-zero segment, causally.
  """
  return _pack(documents, length)[0]


# ---------------------------------------------------------------------------
# Pre-tokenized shards.


def serialize_row(tokens, segment_ids, documents, reads=None) -> bytes:
  """One record: tokens, segment_ids int32 [L]; documents int32 [k] (the
  indices of the row's documents, for make_document); with an image-input
  setting that reads images, reads uint8 [R, F] (the row's READ slots'
  pixel patches, in order)."""
  row = {"tokens": np.asarray(tokens, np.int32),
         "segment_ids": np.asarray(segment_ids, np.int32),
         "documents": np.asarray(documents, np.int32)}
  if reads is not None:
    row["reads"] = np.asarray(reads, np.uint8)
  return serialization.msgpack_serialize(row)


def parse_row(record: bytes) -> dict[str, np.ndarray]:
  """Inverse of serialize_row (msgpack; never unpickles)."""
  row = serialization.msgpack_restore(record)
  out = {k: np.asarray(row[k], np.int32)
         for k in ("tokens", "segment_ids", "documents")}
  if "reads" in row:
    out["reads"] = np.asarray(row["reads"], np.uint8)
  return out


def _check_positive(**values: int) -> None:
  for name, value in values.items():
    if value <= 0:
      raise ValueError(f"{name}={value}; expected > 0 (--{name}).")


def _write_packed(out_dir: str, split: str, length: int, batches,
                  *, total: int, what: str, text_tokenizer, layout,
                  records_per_shard: int) -> dict[str, Any]:
  """Packs and writes batches of documents; returns their statistics.

  batches yields (document_ids [n], kinds [n], tokens [n] int32 [L_i],
  reads [n] uint8 [R_i, F] or None); each batch is packed on its own (rows
  never span two batches) and each row records its documents' ids (and
  their reads, concatenated in order).
  """
  progress = Progress(total, what=what, every_seconds=5.0)
  kind_counts = collections.Counter()
  num_tokens = max_document_length = num_unknown = num_rows = done = 0
  max_reads = 0
  with pretokenize.ShardWriter(out_dir, split, records_per_shard) as writer:
    for ids, kinds, tokens, reads in batches:
      packed, rows = _pack(tokens, length)
      for r, row in enumerate(rows):
        row_reads = None if reads is None else np.concatenate(
            [reads[i] for i in row])
        if row_reads is not None:
          max_reads = max(max_reads, len(row_reads))
        writer.write(serialize_row(packed["tokens"][r],
                                   packed["segment_ids"][r],
                                   [ids[i] for i in row], row_reads))
      num_rows += len(rows)
      kind_counts.update(kinds)
      num_tokens += sum(len(t) for t in tokens)
      max_document_length = max([max_document_length]
                                + [len(t) for t in tokens])
      num_unknown += sum(int((t == layout.text_offset
                              + text_tokenizer.unk_id).sum()) for t in tokens)
      done += len(tokens)
      progress.update(done)
  names = writer.commit()
  epath.Path(out_dir, pretokenize.TEXT_TOKENIZER_FILE).write_bytes(
      text_tokenizer.model_proto)
  return {
      "num_rows": int(num_rows),
      "shards": names,
      "kind_counts": dict(kind_counts),
      "num_tokens": int(num_tokens),
      "fill": round(num_tokens / max(num_rows * length, 1), 4),
      "max_document_length": int(max_document_length),
      "num_unknown_text_tokens": int(num_unknown),
      "max_reads": int(max_reads),
      "seconds": round(progress.elapsed_seconds, 3),
  }


def _metadata(stats: dict[str, Any], *, split: str, length: int, layout,
              tokenizer, text_tokenizer_path: str, tokenizer_workdir: str,
              **fields) -> dict[str, Any]:
  """The SPLIT.json of packed rows: what every writer records, + fields."""
  return {
      "format": FORMAT,
      "caption_prompt": CAPTION_PROMPT,
      "split": split,
      **fields,
      "length": int(length),
      **stats,
      "layout": {"text_vocab_size": layout.text_vocab_size,
                 "image_vocab_size": layout.image_vocab_size,
                 "read_ids": layout.read_ids,
                 "location_bins": layout.location_bins,
                 "size": layout.size,
                 "specials": dict(zip(vocab_lib.SPECIAL_NAMES,
                                      range(vocab_lib.NUM_SPECIALS)))},
      "grid": list(tokenizer.grid),
      "image_length": int(np.prod(tokenizer.grid)),
      # Spans of up to image_length codes, each ended by EOI (LaVIT).
      "end_of_image": pretokenize.variable_length(tokenizer),
      "image_size": int(tokenizer.image_size),
      "text_tokenizer": paths.absolute(text_tokenizer_path),
      "text_tokenizer_copy": pretokenize.TEXT_TOKENIZER_FILE,
      "tokenizer_workdir": (paths.absolute(tokenizer_workdir)
                            if tokenizer_workdir else ""),
      "tokenizer_step": int(tokenizer.step),
  }


def _warn_unknown(num_unknown: int, what: str) -> None:
  if num_unknown:
    logging.warning("%d text tokens are SentencePiece's unk: train the text "
                    "tokenizer on %s so they are covered.", num_unknown, what)


def write_interleaved(tokenizer, text_tokenizer_path: str,
                      out_dir: str, split: str, num_documents: int,
                      length: int, *, seed: int | None = None,
                      kinds: Sequence[str] = DEFAULT_KINDS,
                      weights: Sequence[float] | None = None,
                      documents_per_batch: int = 1024,
                      encode_batch_size: int = 256,
                      records_per_shard: int = pretokenize.RECORDS_PER_SHARD,
                      tokenizer_workdir: str = "",
                      image_input=None,
                      location_bins: int = grounding.DEFAULT_BINS
                      ) -> dict[str, Any]:
  """Writes shapes documents 0..N-1 of `split`, tokenized and packed.

  Args:
    tokenizer: the frozen image tokenizer (unimm.load_tokenizer(workdir), or
      anything with encode(uint8 [B, S, S, 3]) -> ids [B, h, w], image_size,
      grid, num_codes and step).
    text_tokenizer_path: a SentencePiece .model (trained on document_texts).
    out_dir: output directory (this split's shards and SPLIT.json replaced).
    split: split name; its documents are stream `seed`.
    num_documents: documents to write.
    length: tokens per packed row (config.model.max_len).
    seed: the document stream; default SPLIT_SEEDS[split].
    kinds, weights: document kinds and their weights (make_document).
    documents_per_batch: documents tokenized (one image encoding) and
      packed together; rows never span two batches.
    encode_batch_size: images per encoder call (fixed: one compile).
    records_per_shard: packed rows per ArrayRecord shard.
    tokenizer_workdir: where the tokenizer was loaded from, recorded in the
      metadata.
    image_input: an unimm.models.image_input.ImageInput that reads images
      (the image opening each document becomes READ slots and the rows
      carry its pixel patches); None or "codes": every image coded.
    location_bins: cells a side of the location grid of the grounded kinds'
      boxes (refer, grounded_caption, draw_box; Kosmos-2 uses 32); the
      joint vocabulary holds location_bins**2 location ids when `kinds`
      has one of them, none otherwise. The model's config arg bins= must
      match.

  Returns:
    The metadata (also written to out_dir/SPLIT.json).
  """
  image_input = image_input_lib.ImageInput() if image_input is None else (
      image_input)
  if seed is None:
    if split not in SPLIT_SEEDS:
      raise ValueError(f"Split {split!r} has no default seed (those are "
                       f"{SPLIT_SEEDS}); pass --seed.")
    seed = SPLIT_SEEDS[split]
  _check_positive(num_documents=num_documents,
                  documents_per_batch=documents_per_batch,
                  encode_batch_size=encode_batch_size)
  kinds, p = _check_kinds(kinds, weights)
  weights = None if weights is None else [float(w) for w in weights]
  text_tokenizer = text_lib.TextTokenizer.load(text_tokenizer_path)
  layout = vocab_lib.VocabLayout(
      text_tokenizer.vocab_size, tokenizer.num_codes,
      read_ids=image_input.reads_images,
      location_bins=(grounding.check_bins(location_bins)
                     if set(kinds) & set(GROUNDED_KINDS) else 0))
  image_ids_fn = lambda images: pretokenize.encode_images(  # noqa: E731
      tokenizer, images, encode_batch_size)

  def batches():
    for start in range(0, num_documents, documents_per_batch):
      indices = range(start, min(start + documents_per_batch, num_documents))
      documents = [make_document(seed, i, kinds, weights, location_bins)
                   for i in indices]
      tokens, reads = tokenize_documents_and_reads(
          documents, text_tokenizer, image_ids_fn, layout,
          tokenizer.image_size, image_input)
      yield (list(indices), [d.kind for d in documents], tokens,
             reads if image_input.reads_images else None)

  logging.info("Writing %d interleaved documents (%s) of %s into %s, rows of "
               "%d tokens.", num_documents, ", ".join(kinds), split, out_dir,
               length)
  stats = _write_packed(out_dir, split, length, batches(),
                        total=num_documents, what="interleaved documents",
                        text_tokenizer=text_tokenizer, layout=layout,
                        records_per_shard=records_per_shard)
  _warn_unknown(stats["num_unknown_text_tokens"],
                "interleaved.document_texts(...) (instructions included)")
  stats["kind_counts"] = {k: int(stats["kind_counts"].get(k, 0))
                          for k in kinds}
  metadata = _metadata(
      stats, split=split, length=length, layout=layout, tokenizer=tokenizer,
      text_tokenizer_path=text_tokenizer_path,
      tokenizer_workdir=tokenizer_workdir,
      source="shapes", seed=int(seed), num_documents=int(num_documents),
      kinds=list(kinds),
      weights=weights,  # as given (None = uniform), for make_document
      probabilities=[float(w) for w in p],
      documents_per_batch=int(documents_per_batch),
      image_input=dataclasses.asdict(image_input))
  write_report(pretokenize.metadata_path(out_dir, split), metadata)
  logging.info("Wrote %d documents in %d rows of %d tokens (fill %.3f) to "
               "%s.", num_documents, metadata["num_rows"], length,
               metadata["fill"], out_dir)
  return metadata


def pair_segments(kind: str, caption: str, image) -> list[Any]:
  """The document of one (image, caption) pair: [caption, image]
  (caption_image) or [image, CAPTION_PROMPT, caption] (image_caption)."""
  _check_choice("pair document kind", kind, PAIR_KINDS)
  return ([caption, image] if kind == "caption_image"
          else [image, CAPTION_PROMPT, caption])


def draw_caption(captions: Sequence[str], seed: int, index: int,
                 kind: str) -> str:
  """One of a pair's captions for its `kind` document, drawn by
  (seed, index, kind) alone; a pair with one caption always gives it."""
  if len(captions) == 1:
    return captions[0]
  rng = np.random.default_rng([int(seed), int(index), KINDS.index(kind),
                               _RNG_TAG])
  return captions[int(rng.integers(len(captions)))]


def write_pairs(tokenizer, text_tokenizer_path: str, out_dir: str,
                split: str, *, source: str, length: int,
                read_split: str | None = None, num_examples: int | None = None,
                kinds: Sequence[str] = PAIR_KINDS, seed: int = 0,
                max_text_tokens: int = 64, examples_per_batch: int = 512,
                encode_batch_size: int = 256,
                records_per_shard: int = pretokenize.RECORDS_PER_SHARD,
                tokenizer_workdir: str = "",
                image_input=None) -> dict[str, Any]:
  """Writes the documents of a converted data set's (image, caption) pairs,
  tokenized and packed like write_interleaved's.

  Each example gives one document per kind in `kinds` (document id 2 * i
  for caption_image, 2 * i + 1 for image_caption: pair_segments), its image
  encoded once. An example with several captions (the data set's
  "captions") gives each document one of them, drawn by (seed, example,
  kind) (draw_caption). Captions are cut to max_text_tokens pieces (counted
  in the metadata as num_truncated_captions). With an image_input that
  reads images, the image opening an image_caption document is read (its
  rows carry its pixel patches) and a caption_image document's image is
  coded, as write_interleaved does.

  Args:
    tokenizer, text_tokenizer_path, out_dir, length, encode_batch_size,
      records_per_shard, tokenizer_workdir, image_input: as for
      write_interleaved.
    split: the split name written (out_dir/SPLIT.json).
    source: a directory written by unimm.tools.convert.
    read_split: the split of `source` to read (TFDS slicing allowed, e.g.
      "train[-200:]"); default `split`.
    num_examples: the first N examples only (None = all).
    kinds: a non-empty subset of PAIR_KINDS.
    seed: the caption draws.
    max_text_tokens: caption pieces kept per document.
    examples_per_batch: examples read, encoded and packed together.

  Returns:
    The metadata (also written to out_dir/SPLIT.json).
  """
  kinds = tuple(kinds)
  if not kinds or any(k not in PAIR_KINDS for k in kinds):
    raise ValueError(f"kinds={kinds!r}; pairs make documents of the kinds "
                     f"{PAIR_KINDS} (edit stories need the shapes world).")
  _check_positive(max_text_tokens=max_text_tokens,
                  examples_per_batch=examples_per_batch,
                  encode_batch_size=encode_batch_size)
  if num_examples is not None:
    _check_positive(num_examples=num_examples)
  image_input = image_input_lib.ImageInput() if image_input is None else (
      image_input)
  read_split = split if read_split is None else read_split
  text_tokenizer = text_lib.TextTokenizer.load(text_tokenizer_path)
  layout = vocab_lib.VocabLayout(text_tokenizer.vocab_size,
                                 tokenizer.num_codes,
                                 read_ids=image_input.reads_images)
  data_source, _ = pipeline.image_text_source(source, read_split,
                                              image_size=tokenizer.image_size)
  total = len(data_source) if num_examples is None else min(num_examples,
                                                           len(data_source))
  if total == 0:
    raise ValueError(f"{source!r} split {read_split!r} has no examples; "
                     "convert images with captions into it first.")
  dataset = pipeline.image_text_dataset(
      source, read_split, batch_size=examples_per_batch,
      image_size=tokenizer.image_size, shuffle=False, seed=0, num_epochs=1,
      drop_remainder=False)
  truncated = [0]

  def pieces(texts):
    out = text_tokenizer.pieces(texts)
    truncated[0] += sum(len(p) > max_text_tokens for p in out)
    return [p[:max_text_tokens] for p in out]

  def batches():
    done = 0
    for batch in dataset:
      n = min(len(batch["image"]), total - done)
      images = np.asarray(batch["image"][:n])
      if image_input.reads_images:
        # Read images are patches; only caption_image ones are encoded.
        image_of = lambda i: images[i]  # noqa: E731
        image_ids = lambda pixels: pretokenize.encode_images(  # noqa: E731
            tokenizer, pixels, encode_batch_size)
      else:
        # Each image stands in as its index into `codes` (one encoding).
        codes = pretokenize.encode_images(tokenizer, images,
                                          encode_batch_size)  # [n, h, w]
        image_of = lambda i: np.array([i])  # noqa: E731
        image_ids = lambda index: codes[index[:, 0]]  # noqa: E731
      all_captions = batch.get("captions", batch["caption"])
      documents, ids, doc_kinds = [], [], []
      for i in range(n):
        example = done + i
        captions = [c for c in str(all_captions[i]).split(
            convert.CAPTION_SEPARATOR) if c.strip()] or [
                str(batch["caption"][i])]
        for kind in kinds:
          documents.append(pair_segments(
              kind, draw_caption(captions, seed, example, kind),
              image_of(i)))
          ids.append(2 * example + PAIR_KINDS.index(kind))
          doc_kinds.append(kind)
      tokens, reads = vocab_lib.encode_documents_and_reads(
          documents, layout, pieces, image_ids, image_input=image_input)
      yield (ids, doc_kinds, tokens,
             reads if image_input.reads_images else None)
      done += n
      if done >= total:
        return

  logging.info("Writing the documents of %d pairs of %s/%s (%s) into %s, "
               "rows of %d tokens.", total, source, read_split,
               ", ".join(kinds), out_dir, length)
  stats = _write_packed(out_dir, split, length, batches(),
                        total=total * len(kinds), what="pair documents",
                        text_tokenizer=text_tokenizer, layout=layout,
                        records_per_shard=records_per_shard)
  _warn_unknown(stats["num_unknown_text_tokens"],
                f"the captions of {source!r} and {CAPTION_PROMPT!r}")
  if truncated[0]:
    logging.warning("%d captions were cut to max_text_tokens=%d pieces.",
                    truncated[0], max_text_tokens)
  metadata = _metadata(
      stats, split=split, length=length, layout=layout, tokenizer=tokenizer,
      text_tokenizer_path=text_tokenizer_path,
      tokenizer_workdir=tokenizer_workdir,
      source=paths.absolute(source), read_split=read_split, seed=int(seed),
      num_examples=int(total), num_documents=int(total * len(kinds)),
      kinds=list(kinds), max_text_tokens=int(max_text_tokens),
      num_truncated_captions=int(truncated[0]),
      image_input=dataclasses.asdict(image_input))
  write_report(pretokenize.metadata_path(out_dir, split), metadata)
  logging.info("Wrote %d pair documents in %d rows of %d tokens (fill %.3f) "
               "to %s.", metadata["num_documents"], metadata["num_rows"],
               length, metadata["fill"], out_dir)
  return metadata


def load_metadata(out_dir: str, split: str = "train") -> dict[str, Any]:
  """The metadata of a split written by write_interleaved."""
  metadata = pretokenize.load_metadata(out_dir, split,
                                       command="unimm.tools.pack_interleaved")
  found = str(metadata.get("format"))
  if found != FORMAT and found.startswith("unimm_interleaved/"):
    raise ValueError(
        f"{pretokenize.metadata_path(out_dir, split)!r} holds interleaved "
        f"rows of an older format ({found!r}; this unimm reads {FORMAT!r}: "
        "image-to-text documents now ask for their caption); re-pack them "
        "with `python -m unimm.tools.pack_interleaved`.")
  if found != FORMAT:
    raise ValueError(
        f"{pretokenize.metadata_path(out_dir, split)!r} has format "
        f"{metadata.get('format')!r}, not interleaved rows ({FORMAT!r}); "
        "point config.data.packed_dir at a directory written by "
        "`python -m unimm.tools.pack_interleaved`.")
  return metadata


def image_input_of(metadata: dict[str, Any]) -> image_input_lib.ImageInput:
  """The image-input setting packed rows were written for."""
  return image_input_lib.ImageInput(**metadata.get("image_input", {}))


def read_length(metadata: dict[str, Any]) -> int:
  """The reads every batch row is padded to: the longest row's, rounded up
  to whole images of the tokenizer's size (0 when nothing is read)."""
  setting = image_input_of(metadata)
  if not setting.reads_images:
    return 0
  per_image = (int(metadata["image_size"]) // setting.patch_size) ** 2
  return max(1, -(-int(metadata["max_reads"]) // per_image)) * per_image


def _as_batch_arrays(record: bytes, reads: int = 0
                     ) -> dict[str, np.ndarray]:
  row = parse_row(record)
  features = packed_features(row["segment_ids"][None])
  out = {"tokens": row["tokens"], "segment_ids": row["segment_ids"],
         **{k: v[0] for k, v in features.items()}}
  if reads:
    out["reads"] = np.pad(row["reads"],
                          ((0, reads - len(row["reads"])), (0, 0)))
  return out


def packed_dataset(out_dir: str, split: str = "train", *, batch_size: int,
                   shuffle: bool, seed: int, num_epochs: int | None = None,
                   process_index: int = 0, process_count: int = 1,
                   worker_count: int = 0, drop_remainder: bool = True):
  """Batches of packed rows: tokens, segment_ids, positions, loss_mask, each
  int32 [B, length] (see pack); with an image-input setting that reads
  images, also reads uint8 [B, read_length(metadata), p*p*3].

  Sharded per host, shuffled per epoch and checkpointable, through
  unimm.data.pipeline.batched_dataset; see it for the arguments.
  """
  metadata = load_metadata(out_dir, split)
  source = pretokenize.shard_source(out_dir, split, metadata,
                                    metadata["num_rows"],
                                    command="unimm.tools.pack_interleaved")
  return pipeline.batched_dataset(
      source, batch_size=batch_size, shuffle=shuffle, seed=seed,
      num_epochs=num_epochs, process_index=process_index,
      process_count=process_count,
      transform=functools.partial(_as_batch_arrays,
                                  reads=read_length(metadata)),
      drop_remainder=drop_remainder, worker_count=worker_count)
