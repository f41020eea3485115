"""Tests for unimm/data/questions.py: every answer checked against the
scene's ground truth by an independent reading of the question."""
import collections
import re
import string

import numpy as np
import pytest

from unimm.data import questions
from unimm.data import shapes

NUMBERS = {"zero": 0, "one": 1, "two": 2}
# Where a location word puts an object's centre ([0, 1] canvas units).
PLACES = {"top": lambda x, y: y < 1 / 3, "bottom": lambda x, y: y > 2 / 3,
          "left": lambda x, y: x < 1 / 3, "right": lambda x, y: x > 2 / 3,
          "center": lambda x, y: 1 / 3 < x < 2 / 3 and 1 / 3 < y < 2 / 3}


def random_scenes(num, seed=0, num_objects=(1, 2)):
  return [shapes.scene_from_rng(np.random.default_rng([seed, i]), num_objects)
          for i in range(num)]


def question_scenes():
  same_shape = shapes.Scene(
      (shapes.Object("square", "red", "big", (0, 0)),
       shapes.Object("square", "blue", "small", (2, 1))), "above", 1)
  same_color = shapes.Scene(
      (shapes.Object("star", "green", "small", (1, 2)),
       shapes.Object("circle", "green", "big", (1, 0))), "right of", 2)
  return random_scenes(150, seed=11) + [same_shape, same_color]


def referents(scene, ref):
  """The objects a reference picks out, read from the words alone: a shape
  (and colour), a colour, or a place judged by the object's centre."""
  words = ref.split()
  assert words[0] == "the", ref
  if words[1] == "object":  # the object at the top left / on the left ...
    place = [w for w in words[2:] if w not in ("at", "the", "on", "in")]
    return [o for o in scene.objects
            if all(PLACES[w](*shapes.object_center(o)) for w in place)]
  if words[-1] == "object":  # the red object
    return [o for o in scene.objects if o.color == words[1]]
  if len(words) == 3:  # the red square
    return [o for o in scene.objects
            if (o.color, o.shape) == (words[1], words[2])]
  return [o for o in scene.objects if o.shape == words[1]]


def the_one(scene, ref):
  found = referents(scene, ref)
  assert len(found) == 1, f"{ref!r} picks {len(found)} objects of {scene}"
  return found[0]


def true_answer(scene, question):
  """The answer from the scene's ground truth, for a question read here."""
  objects = scene.objects
  if question == "how many objects are there?":
    return len(objects)
  if m := re.fullmatch(r"how many (\w+) objects are there\?", question):
    return sum(o.color == m[1] for o in objects)
  if m := re.fullmatch(r"what colour is (the .+)\?", question):
    return the_one(scene, m[1]).color
  if m := re.fullmatch(r"what shape is (the .+)\?", question):
    return the_one(scene, m[1]).shape
  if m := re.fullmatch(r"what size is (the .+)\?", question):
    return the_one(scene, m[1]).size
  if m := re.fullmatch(r"is (the .+?) (to the left of|to the right of|above|"
                       r"below) (the .+)\?", question):
    (xa, ya), (xb, yb) = (shapes.object_center(the_one(scene, m[1])),
                          shapes.object_center(the_one(scene, m[3])))
    dx, dy = xb - xa, yb - ya  # b's centre relative to a's
    along = {"to the left of": dx, "to the right of": -dx, "above": dy,
             "below": -dy}[m[2]]
    # Asked only where the centres are clearly apart on that axis.
    assert abs(along) > 0.5 / shapes.GRID, (scene, question)
    return along > 0
  if m := re.fullmatch(r"is there an? (?:(\w+) )?(\w+)\?", question):
    color, shape = m[1], m[2]
    return any(o.shape == shape and color in (None, o.color) for o in objects)
  raise AssertionError(f"Unknown question {question!r}")


def as_value(answer):
  if answer in ("yes", "no"):
    return answer == "yes"
  return NUMBERS.get(answer, answer)


def test_every_answer_is_true_of_the_scene():
  kinds = collections.Counter()
  for i, scene in enumerate(question_scenes()):
    found = questions.questions_by_kind(scene, np.random.default_rng(i))
    assert set(found) <= set(questions.KINDS)
    assert ("relation" in found) == (len(scene.objects) == 2)
    for kind, pairs in found.items():
      kinds[kind] += len(pairs)
      for question, answer in pairs:
        assert len(answer.split()) == 1 and answer == answer.strip()
        assert answer in questions.ANSWERS
        assert as_value(answer) == true_answer(scene, question), (
            scene, question, answer)
  assert set(kinds) == set(questions.KINDS)


def test_questions_do_not_repeat_and_yes_no_is_balanced():
  for i, scene in enumerate(question_scenes()):
    found = questions.questions_by_kind(scene, np.random.default_rng(i))
    flat = [q for pairs in found.values() for q, _ in pairs]
    assert len(flat) == len(set(flat))
    for kind in ("relation", "exists"):
      answers = collections.Counter(a for _, a in found.get(kind, []))
      assert answers["yes"] == answers["no"], (scene, kind, answers)
    # Some "how many COLOUR objects" question has the answer zero.
    assert any(a == "zero" for _, a in found["count"])


def test_questions_are_deterministic_per_rng_seed():
  scenes = question_scenes()[:40]
  first = [questions.questions(s, np.random.default_rng(7)) for s in scenes]
  again = [questions.questions(s, np.random.default_rng(7)) for s in scenes]
  assert first == again
  other = [questions.questions(s, np.random.default_rng(8)) for s in scenes]
  assert other != first  # rng draws the negatives
  draws = lambda seed: [questions.random_question(  # noqa: E731
      s, np.random.default_rng(seed)) for s in scenes]
  assert draws(3) == draws(3)
  assert draws(3) != draws(4)


def test_random_question_picks_kinds_uniformly():
  scenes = random_scenes(600, seed=13, num_objects=2)
  rng = np.random.default_rng(0)
  asked = collections.Counter()
  for scene in scenes:
    question, answer = questions.random_question(scene, rng)
    assert as_value(answer) == true_answer(scene, question)
    for kind, pairs in questions.questions_by_kind(
        scene, np.random.default_rng(0)).items():
      if question in [q for q, _ in pairs]:
        asked[kind] += 1
        break
  expected = len(scenes) / len(questions.KINDS)
  assert all(abs(asked[k] - expected) < 0.35 * expected
             for k in questions.KINDS), asked
  question, _ = questions.random_question(scenes[0], rng, kinds=("size",))
  assert question.startswith("what size is ")


def test_random_question_bad_kinds_raise():
  one = random_scenes(1, num_objects=1)[0]
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="'colour'"):
    questions.random_question(one, rng, kinds=("colour",))
  with pytest.raises(ValueError, match=r"no question of the kinds "
                     r"\('relation',\)"):
    questions.random_question(one, rng, kinds=("relation",))
  with pytest.raises(ValueError, match="num_scenes=-1"):
    questions.corpus(-1)


def test_vocabulary_is_the_captions_plus_new_words():
  texts = questions.corpus(200, seed=1)
  used = {w.strip(string.punctuation) for t in texts for w in t.split()}
  known = shapes.caption_words()
  assert "colour" not in known and "color" not in known
  assert used - known == set(questions.NEW_WORDS)
  assert not set(questions.NEW_WORDS) & known
  assert questions.corpus(5, seed=1) == texts[:len(questions.corpus(5, 1))]


def test_exact_match_accuracy():
  assert questions.normalize_answer("  Red.  ") == "red"
  assert questions.normalize_answer("YES!?") == "yes"
  assert questions.normalize_answer("top   Left") == "top left"
  assert questions.normalize_answer("a red") == "a red"  # no article strip
  predictions = ["Red.", " two", "yes!", "a star", "2"]
  answers = ["red", "two", "Yes", "star", "two"]
  assert questions.exact_match_accuracy(predictions, answers) == 0.6
  assert questions.exact_match_accuracy(answers, answers) == 1.0
  with pytest.raises(ValueError, match="2 predictions for 1 answers"):
    questions.exact_match_accuracy(["a", "b"], ["a"])
  with pytest.raises(ValueError, match="0 predictions for 0 answers"):
    questions.exact_match_accuracy([], [])


def test_kind_of_reads_back_each_generated_kind():
  rng = np.random.default_rng(7)
  for _ in range(40):
    scene = shapes.scene_from_rng(rng)
    for kind, found in questions.questions_by_kind(scene, rng).items():
      assert {questions.kind_of(q) for q, _ in found} == {kind}
  with pytest.raises(ValueError, match="not a question"):
    questions.kind_of("describe the image")
