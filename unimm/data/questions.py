"""Questions with one-word answers about shapes scenes, and their scoring.

Every question is generated from a scene's ground truth (shapes.Scene) and
asked only where its answer is unambiguous: each object it mentions is
named so that exactly one object of the scene fits, and a relation is
asked only along an axis on which the two objects' cells differ (so the
objects' centres are a clear cell apart along it). Kinds (KINDS):

  count     "how many objects are there?" -> "two"
            "how many red objects are there?" -> "zero" | "one" | "two"
  color     "what colour is the star?" / "... the object at the top left?"
  shape     "what shape is the red object?" / "... the object on the left?"
  size      "what size is the red star?" -> "small" | "big"
  relation  "is the star to the left of the square?" -> "yes" | "no"
  exists    "is there a blue square?" / "is there a cross?" -> "yes" | "no"

Objects are named by shape ("the star", with the colour when both objects
share the shape: grounding.object_phrase), by a unique colour ("the red
object") or by cell ("the object at the top left", with the location
phrases of shapes' captions; only where the other object is not there even
read loosely: not in the top row for "the object at the top"). Colours,
shapes, sizes, cells and relations are spelt as in the captions, which
never say "colour" or "color": questions say "colour", as the project's
prose does. The question and answer words that no caption holds are
NEW_WORDS, so a SentencePiece model that should read questions is trained
on `corpus(...)` with the captions.

  questions(scene, rng)          # [(question, answer)], every kind
  random_question(scene, rng)    # a kind uniformly, then one of its questions
  exact_match_accuracy(predictions, answers)

Both generators are deterministic given the rng's state: rng draws only the
negatives (absent colours and (colour, shape) pairs) and the pick.
Yes/no kinds are balanced: each "yes" relation question comes with its
"no" counterpart, and "exists" has as many absent objects as present ones.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from unimm.data import grounding
from unimm.data import shapes

KINDS = ("count", "color", "shape", "size", "relation", "exists")
NUMBER_WORDS = ("zero", "one", "two")
YES, NO = "yes", "no"
# Every answer a question of this module can have.
ANSWERS = (NUMBER_WORDS + shapes.COLORS + shapes.SHAPES + shapes.SIZES
           + (YES, NO))
COLOR_WORD = "colour"
# Question and answer words that no caption holds.
NEW_WORDS = ("are", "colour", "how", "many", "no", "object", "objects",
             "one", "shape", "size", "two", "what", "yes", "zero")
# Stripped from the end of an answer by normalize_answer.
TRAILING_PUNCTUATION = ".,!?;:"
_RNG_TAG = 0x9A  # keeps corpus scenes apart from other streams


def _article(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def _at(cell: tuple[int, int], name: str) -> bool:
  """Whether `cell` is at the place a cell name says, read loosely: "top"
  is the whole top row, "top left" the corner, "center" the centre cell."""
  row, col = cell
  tests = {"top": row == 0, "bottom": row == shapes.GRID - 1,
           "left": col == 0, "right": col == shapes.GRID - 1,
           "center": (row, col) == (shapes.GRID // 2, shapes.GRID // 2)}
  return all(tests[word] for word in name.split())


def _location_ref(scene: shapes.Scene, index: int) -> str | None:
  """"the object at the top left" (the captions' location phrase) if no
  other object is there even read loosely (another object in the top row
  rules out "the object at the top"), else None."""
  name = shapes.CELL_NAMES[scene.objects[index].cell]
  if sum(_at(o.cell, name) for o in scene.objects) != 1:
    return None
  return f"the object {shapes.LOCATION_PHRASES[scene.objects[index].cell]}"


def _shape_ref(scene: shapes.Scene, index: int) -> str | None:
  """"the SHAPE" if no other object has that shape, else None."""
  shape = scene.objects[index].shape
  if sum(o.shape == shape for o in scene.objects) != 1:
    return None
  return f"the {shape}"


def _color_ref(scene: shapes.Scene, index: int) -> str | None:
  """"the COLOR object" if no other object has that colour, else None."""
  color = scene.objects[index].color
  if sum(o.color == color for o in scene.objects) != 1:
    return None
  return f"the {color} object"


def _count_questions(scene: shapes.Scene, rng: np.random.Generator
                     ) -> list[tuple[str, str]]:
  out = [("how many objects are there?", NUMBER_WORDS[len(scene.objects)])]
  present = sorted({o.color for o in scene.objects}, key=shapes.COLORS.index)
  absent = [c for c in shapes.COLORS if c not in present]
  for color in present + [absent[int(rng.integers(len(absent)))]]:
    count = sum(o.color == color for o in scene.objects)
    out.append((f"how many {color} objects are there?", NUMBER_WORDS[count]))
  return out


def _attribute_questions(scene: shapes.Scene
                         ) -> dict[str, list[tuple[str, str]]]:
  out = {"color": [], "shape": [], "size": []}
  for k, obj in enumerate(scene.objects):
    location = _location_ref(scene, k)
    for ref in (_shape_ref(scene, k), location):
      if ref is not None:
        out["color"].append((f"what {COLOR_WORD} is {ref}?", obj.color))
    for ref in (_color_ref(scene, k), location):
      if ref is not None:
        out["shape"].append((f"what shape is {ref}?", obj.shape))
    for ref in (grounding.object_phrase(scene, k), location):
      if ref is not None:
        out["size"].append((f"what size is {ref}?", obj.size))
  return out


def _relation_questions(scene: shapes.Scene) -> list[tuple[str, str]]:
  if len(scene.objects) != 2:
    return []
  out = []
  for a, b in ((0, 1), (1, 0)):
    cell_a, cell_b = scene.objects[a].cell, scene.objects[b].cell
    ref_a, ref_b = (grounding.object_phrase(scene, a),
                    grounding.object_phrase(scene, b))
    for relation in shapes.RELATIONS:
      axis = 1 if relation in ("left of", "right of") else 0
      if cell_a[axis] == cell_b[axis]:
        continue  # Same column (row): no clear answer along this axis.
      holds = shapes.relation_holds(relation, cell_a, cell_b)
      out.append((f"is {ref_a} {shapes.RELATION_PHRASES[relation]} {ref_b}?",
                  YES if holds else NO))
  return out


def _exists_questions(scene: shapes.Scene, rng: np.random.Generator
                      ) -> list[tuple[str, str]]:
  objects = scene.objects
  pairs = [(o.color, o.shape) for o in objects]
  present_shapes = {o.shape for o in objects}
  absent_pairs = [(c, s) for s in shapes.SHAPES for c in shapes.COLORS
                  if (c, s) not in pairs]
  # Hard negatives first: a present colour on another present shape.
  swaps = [(c, s) for c, _ in pairs for _, s in pairs
           if (c, s) in absent_pairs]
  negatives = []
  if swaps:
    negatives.append(swaps[int(rng.integers(len(swaps)))])
  while len(negatives) < len(objects):
    pair = absent_pairs[int(rng.integers(len(absent_pairs)))]
    if pair not in negatives:
      negatives.append(pair)
  absent_shapes = [s for s in shapes.SHAPES if s not in present_shapes]
  shape_negatives = [absent_shapes[i] for i in rng.choice(
      len(absent_shapes), len(present_shapes), replace=False)]
  out = []
  for (color, shape), answer in ([(p, YES) for p in pairs]
                                 + [(p, NO) for p in negatives]):
    out.append((f"is there {_article(color)} {color} {shape}?", answer))
  present = sorted(present_shapes, key=shapes.SHAPES.index)
  for shape, answer in ([(s, YES) for s in present]
                        + [(s, NO) for s in shape_negatives]):
    out.append((f"is there {_article(shape)} {shape}?", answer))
  return out


def questions_by_kind(scene: shapes.Scene, rng: np.random.Generator
                      ) -> dict[str, list[tuple[str, str]]]:
  """The scene's questions per kind (KINDS order; a kind with none, e.g.
  "relation" for one object, is left out). Draws from rng in a fixed order:
  the same rng state gives the same questions."""
  attributes = _attribute_questions(scene)
  found = {"count": _count_questions(scene, rng), **attributes,
           "relation": _relation_questions(scene),
           "exists": _exists_questions(scene, rng)}
  return {kind: found[kind] for kind in KINDS if found[kind]}


def questions(scene: shapes.Scene, rng: np.random.Generator
              ) -> list[tuple[str, str]]:
  """Every question of the scene with its one-word answer, kind by kind
  (questions_by_kind flattened)."""
  return [qa for found in questions_by_kind(scene, rng).values()
          for qa in found]


def random_question(scene: shapes.Scene, rng: np.random.Generator,
                    kinds: Sequence[str] = KINDS) -> tuple[str, str]:
  """One (question, answer): a kind uniformly among `kinds` the scene has
  questions of, then one of its questions uniformly."""
  kinds = tuple(kinds)
  if not kinds or any(k not in KINDS for k in kinds):
    raise ValueError(f"kinds={kinds!r}; expected a non-empty subset of "
                     f"{KINDS}.")
  found = questions_by_kind(scene, rng)
  available = [k for k in kinds if k in found]
  if not available:
    raise ValueError(f"A {len(scene.objects)}-object scene has no question "
                     f"of the kinds {kinds} (relation needs two objects).")
  candidates = found[available[int(rng.integers(len(available)))]]
  return candidates[int(rng.integers(len(candidates)))]


def kind_of(question: str) -> str:
  """The KINDS entry a generated question belongs to (by its opening
  words), for per-kind accuracies."""
  text = " ".join(question.lower().split())
  for prefix, kind in (("how many ", "count"),
                       (f"what {COLOR_WORD} ", "color"),
                       ("what shape ", "shape"), ("what size ", "size"),
                       ("is there ", "exists"), ("is ", "relation")):
    if text.startswith(prefix):
      return kind
  raise ValueError(f"{question!r} is not a question of this module "
                   f"(kinds {KINDS}).")


def corpus(num_scenes: int, seed: int = 0) -> list[str]:
  """The questions and answers of `num_scenes` random scenes (scene i drawn
  by np.random.default_rng([seed, i, _RNG_TAG])): text for training a
  SentencePiece model that reads them, alongside the captions."""
  if (isinstance(num_scenes, bool)
      or not isinstance(num_scenes, (int, np.integer)) or num_scenes < 0):
    raise ValueError(f"num_scenes={num_scenes!r}; expected a non-negative "
                     "int.")
  texts = []
  for i in range(num_scenes):
    rng = np.random.default_rng([int(seed), i, _RNG_TAG])
    for question, answer in questions(shapes.scene_from_rng(rng), rng):
      texts += [question, answer]
  return texts


def normalize_answer(text: str) -> str:
  """Lower case, whitespace trimmed and collapsed to single spaces, and
  trailing punctuation (TRAILING_PUNCTUATION) dropped: " Red. " -> "red".
  Nothing else is changed (no article stripping, "2" stays "2")."""
  text = " ".join(str(text).lower().split())
  return text.rstrip(TRAILING_PUNCTUATION).strip()


def exact_match_accuracy(predictions: Sequence[str],
                         answers: Sequence[str]) -> float:
  """Fraction of predictions equal to their answers after normalize_answer.

  ValueError if the two lists differ in length or are empty.
  """
  predictions, answers = list(predictions), list(answers)
  if len(predictions) != len(answers) or not answers:
    raise ValueError(f"{len(predictions)} predictions for {len(answers)} "
                     "answers; expected the same number, at least one.")
  return float(np.mean([normalize_answer(p) == normalize_answer(a)
                        for p, a in zip(predictions, answers)]))
