"""Scoring of interleaved generations against the true scenes."""
import dataclasses
import json
import os
import types

import numpy as np
import pytest

from unimm.data import grounding
from unimm.data import interleaved as documents_lib
from unimm.data import questions as questions_lib
from unimm.data import shapes
from unimm.evaluation import interleaved_eval
from unimm.evaluation import probe as probe_lib


def test_a_true_caption_is_correct_and_a_wrong_one_is_not():
  doc = documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], 0,
                                    kinds=("image_caption",))
  scene = doc.scenes[0]
  for template in range(len(shapes.TEMPLATES[len(scene.objects)])):
    assert interleaved_eval.caption_correct(shapes.caption(scene, template),
                                            scene)
  other = next(c for c in shapes.COLORS if c != scene.objects[0].color)
  wrong = shapes.Scene(
      objects=(scene.objects[0].__class__(
          **{**scene.objects[0].__dict__, "color": other}),)
      + tuple(scene.objects[1:]),
      **{k: v for k, v in scene.__dict__.items() if k != "objects"})
  assert not interleaved_eval.caption_correct(shapes.caption(wrong, 0), scene)
  assert not interleaved_eval.caption_correct("not a caption at all", scene)


class _OracleProbe:
  """Reads back exactly the scenes it was shown rendering (by pixels)."""

  def __init__(self, size):
    self.size, self.scenes = size, {}

  def render(self, scene):
    image = shapes.render(scene, self.size)
    self.scenes[image.tobytes()] = interleaved_eval._truth(scene)  # pylint: disable=protected-access
    return image

  def predict(self, images):
    return [self.scenes[np.asarray(i).tobytes()] for i in images]


def _recoloured(scene):
  """The scene with every object in another colour."""
  return dataclasses.replace(scene, objects=tuple(
      dataclasses.replace(o, color=next(c for c in shapes.COLORS
                                        if c != o.color))
      for o in scene.objects))


class _FakeModel:
  """An api.InterleavedModel stand-in that draws the true answers, except
  that its captions can name a wrong colour and its edits can return the
  source unchanged or draw the edited scene in the wrong colours."""

  def __init__(self, probe, wrong_colour=False, no_edits=False,
               wrong_edit_colour=False):
    self.probe, self.wrong_colour, self.no_edits = probe, wrong_colour, no_edits
    self.wrong_edit_colour = wrong_edit_colour
    self.tokenizer = types.SimpleNamespace(
        image_size=probe.size, encode=lambda x: x, decode=lambda x: x)
    self.image_length = 64
    self.prompt_scenes = {}
    for prompt, scene in probe_lib.fixed_prompt_set(20, 0):
      self.probe.render(scene)
      self.prompt_scenes[prompt] = scene
    self.edits = {}
    for i in range(20):
      doc = documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], i,
                                        kinds=("edit",))
      source = shapes.render(doc.scenes[0], probe.size).tobytes()
      self.edits[source, doc.instructions[0]] = doc.scenes[1]

  def sample(self, prompts, **unused_kwargs):
    return np.stack([self.probe.render(self.prompt_scenes[p])
                     for p in prompts])

  def caption(self, images, **unused_kwargs):
    captions = []
    for image in images:
      obj = self.probe.scenes[image.tobytes()].objects
      scene = next(s for s in self._all_scenes()
                   if interleaved_eval._truth(s).objects == obj)  # pylint: disable=protected-access
      if self.wrong_colour:
        scene = _recoloured(scene)
      captions.append(shapes.caption(scene, 0))
    return captions

  def _all_scenes(self):
    return [documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], i,
                                        kinds=("image_caption",)).scenes[0]
            for i in range(20)]

  def generate_batch(self, documents, **unused_kwargs):
    outputs = []
    for image, text in documents:
      if self.no_edits:
        outputs.append([image])
      else:
        scene = self.edits[image.tobytes(), text]
        if self.wrong_edit_colour:
          scene = _recoloured(scene)
        outputs.append([self.probe.render(scene)])
    return outputs


def _evaluate(model, tmp_path, monkeypatch):
  monkeypatch.setattr(probe_lib, "get_probe", lambda *a, **k: model.probe)
  for doc in (documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], i,
                                          kinds=(kind,))
              for kind in ("image_caption", "edit") for i in range(20)):
    for scene in doc.scenes[:2]:  # edits: the source and the edited scene
      model.probe.render(scene)
  return interleaved_eval.evaluate_generation(
      model, str(tmp_path), num_prompts=20, num_captions=20, num_edits=20,
      batch_size=8)


def test_a_model_that_answers_right_scores_one_everywhere(tmp_path,
                                                          monkeypatch):
  report = _evaluate(_FakeModel(_OracleProbe(32)), tmp_path, monkeypatch)
  accuracies = {k: v for k, v in report.items() if "accuracy" in k}
  assert {"prompt_accuracy_single", "prompt_color_accuracy",
          "caption_accuracy", "caption_accuracy_single",
          "caption_accuracy_pair", "caption_color_accuracy",
          "edit_accuracy", "edit_accuracy_move", "edit_shape_accuracy",
          "edit_position_accuracy", "reconstructed_edit_accuracy"
          } <= set(accuracies)
  assert accuracies == {k: 1.0 for k in accuracies}
  verdicts = _verdicts(tmp_path)
  assert [sum(v["task"] == t for v in verdicts)
          for t in ("prompt", "caption", "edit")] == [20, 20, 20]
  assert all(v["correct"] for v in verdicts)
  assert (tmp_path / "documents.png").exists()


def test_the_breakdown_names_what_is_wrong(tmp_path, monkeypatch):
  report = _evaluate(_FakeModel(_OracleProbe(32), wrong_colour=True,
                                no_edits=True), tmp_path, monkeypatch)
  assert report["caption_accuracy"] == 0.0
  assert report["caption_color_accuracy"] == 0.0
  assert report["caption_shape_accuracy"] == 1.0
  assert report["caption_count_accuracy"] == 1.0
  assert report["caption_parse_rate"] == 1.0
  assert report["prompt_accuracy_single"] == 1.0
  ops = [k for k in report if k.startswith("edit_accuracy_")]
  assert ops and all(report[k] == 0.0 for k in ops + ["edit_accuracy"]), report
  # The ceiling reads the true edited scenes, whatever the model drew.
  assert report["reconstructed_edit_accuracy"] == 1.0


def _verdicts(out_dir):
  with open(os.path.join(out_dir, "verdicts.jsonl")) as f:
    return [json.loads(line) for line in f]


def test_the_edit_breakdown_names_the_wrong_attribute(tmp_path, monkeypatch):
  report = _evaluate(_FakeModel(_OracleProbe(32), wrong_edit_colour=True),
                     tmp_path, monkeypatch)
  assert report["edit_accuracy"] == 0.0
  assert report["edit_color_accuracy"] == 0.0
  for name in ("shape", "size", "position", "count"):
    assert report[f"edit_{name}_accuracy"] == 1.0, name
  assert report["caption_accuracy"] == 1.0
  edits = [v for v in _verdicts(tmp_path) if v["task"] == "edit"]
  assert edits and all(not v["color"] and v["shape"] and v["image_found"]
                       for v in edits)
  # Each line names the document: its instruction and the scene it asks for.
  assert all(shapes.parse_caption(v["expected"]) is not None for v in edits)


def test_grounded_captions_score_words_and_boxes_apart():
  scene = next(d.scenes[0] for d in (
      documents_lib.make_document(5, i, kinds=("grounded_caption",))
      for i in range(50)) if len(d.scenes[0].objects) == 2)
  segments = grounding.grounded_caption(scene, template=0)
  score = lambda text: interleaved_eval.grounded_caption_scores(  # noqa: E731
      text, scene, bins=16)
  # Markup as the API writes it (no <p> markers) or with them.
  truth = grounding.to_text(segments)
  unmarked = truth.replace("<p>", "").replace("</p>", " ")
  for text in (truth, unmarked):
    assert score(text) == dict(correct=True, words=True, boxes=True)
  boxes = grounding.boxes(segments)
  swapped = grounding.to_text(
      [{boxes[0]: boxes[1], boxes[1]: boxes[0]}.get(s, s)
       if isinstance(s, grounding.BoxTokens) else s for s in segments])
  assert score(swapped) == dict(correct=False, words=True, boxes=False)
  one_box = grounding.to_text([s for s in segments if s != boxes[1]])
  assert score(one_box)["boxes"] is False
  wrong_words = grounding.to_text(grounding.grounded_caption(
      _recoloured(scene), template=0))
  assert score(wrong_words) == dict(correct=False, words=False, boxes=False)
  assert score("a star <box><loc_3></box>") == dict(
      correct=False, words=False, boxes=False)


def test_a_drawing_counts_where_the_probe_finds_each_object():
  scene = next(d.scenes[0] for d in (
      documents_lib.make_document(5, i, kinds=("draw_box",))
      for i in range(50)) if len(d.scenes[0].objects) == 2)
  truth = interleaved_eval._truth(scene)  # pylint: disable=protected-access
  assert interleaved_eval.drawn_in_boxes(truth, scene) == [True, True]
  first = truth.objects[0]
  elsewhere = next(c for c in shapes.CELLS
                   if c not in {o.cell for o in truth.objects})
  for changed in (dataclasses.replace(first, cell=elsewhere),
                  dataclasses.replace(first, color=_recoloured(
                      scene).objects[0].color)):
    read = probe_lib.PredictedScene((changed, *truth.objects[1:]))
    # The probe lists objects in cell order; the match is by cell.
    assert interleaved_eval.drawn_in_boxes(read, scene).count(False) == 1
  assert interleaved_eval.drawn_in_boxes(probe_lib.PredictedScene(()),
                                         scene) == [False, False]


class _GroundingModel(_FakeModel):
  """Writes the true grounded captions and draws the requested scenes;
  wrong_boxes: its captions' boxes are each the whole image."""

  def __init__(self, probe, wrong_boxes=False, bins=16):
    super().__init__(probe)
    self.layout = types.SimpleNamespace(location_bins=bins)
    self.wrong_boxes = wrong_boxes
    self.grounded = {}
    self.drawn = {}
    for i in range(10):
      doc = documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], i,
                                        kinds=("grounded_caption",),
                                        bins=bins)
      self.grounded[probe.render(doc.scenes[0]).tobytes()] = doc.answer
      doc = documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"], i,
                                        kinds=("draw_box",), bins=bins)
      self.drawn[grounding.to_text(doc.segments[:-1])] = doc.scenes[0]
      probe.render(doc.scenes[0])

  def caption(self, images, grounded=False, **kwargs):
    if not grounded:
      return super().caption(images, **kwargs)
    out = []
    for image in images:
      segments = self.grounded[image.tobytes()]
      if self.wrong_boxes:
        bins = self.layout.location_bins
        segments = [grounding.BoxTokens(0, bins**2 - 1, bins)  # whole image
                    if isinstance(s, grounding.BoxTokens) else s
                    for s in segments]
      out.append(grounding.to_text(segments))
    return out

  def generate_batch(self, documents, **kwargs):
    if not isinstance(documents[0][0], str):
      return super().generate_batch(documents, **kwargs)
    return [["", self.probe.render(self.drawn[grounding.to_text(d)])]
            for d in documents]


@pytest.mark.parametrize("bins", [16, 32])
def test_grounded_captions_and_drawings_in_the_report(tmp_path, monkeypatch,
                                                      bins):
  # The eval asks on the model's own location grid.
  monkeypatch.setattr(probe_lib, "get_probe", lambda *a, **k: probe)
  for wrong_boxes in (False, True):
    probe = _OracleProbe(32)
    model = _GroundingModel(probe, wrong_boxes=wrong_boxes, bins=bins)
    for doc in (documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"],
                                            i, kinds=(kind,))
                for kind in ("image_caption", "edit") for i in range(20)):
      for scene in doc.scenes[:2]:
        probe.render(scene)
    report = interleaved_eval.evaluate_generation(
        model, str(tmp_path), num_prompts=4, num_captions=4, num_edits=4,
        batch_size=4, num_grounded=10, num_drawn=10)
    assert report["grounded_caption_words_accuracy"] == 1.0
    assert report["grounded_caption_ceiling"] == 1.0
    assert report["grounded_caption_accuracy"] == (0.0 if wrong_boxes
                                                   else 1.0)
    assert report["draw_box_accuracy"] == 1.0
    assert report["draw_box_object_accuracy"] == 1.0
    assert report["draw_box_ceiling"] == 1.0
  verdicts = _verdicts(tmp_path)
  assert sum(v["task"] == "grounded_caption" for v in verdicts) == 10
  assert sum(v["task"] == "draw_box" for v in verdicts) == 10


class _AskingModel(_FakeModel):
  """Answers held-out questions and grounds referring phrases from the
  truth of the scene it is shown; wrong_colours: answers every colour
  question wrong; wrong_pairs: boxes the other object of two-object scenes;
  invents: boxes the first object for a phrase that names nothing."""

  def __init__(self, probe, wrong_colours=False, wrong_pairs=False,
               invents=False):
    super().__init__(probe)
    self.layout = types.SimpleNamespace(location_bins=16)
    self.wrong_colours, self.wrong_pairs = wrong_colours, wrong_pairs
    self.invents = invents
    self.scenes = {}
    for kind in ("question", "refer"):
      for i in range(30):
        scene = documents_lib.make_document(
            documents_lib.SPLIT_SEEDS["test"], i, kinds=(kind,)).scenes[0]
        self.scenes[shapes.render(scene, probe.size).tobytes()] = scene

  def answer(self, images, asked):
    out = []
    for image, question in zip(images, asked):
      truth = next(d.answer for d in (documents_lib.make_document(
          documents_lib.SPLIT_SEEDS["test"], i, kinds=("question",))
                                      for i in range(30))
                   if d.question == question and shapes.render(
                       d.scenes[0], self.probe.size).tobytes()
                   == image.tobytes())
      wrong = self.wrong_colours and questions_lib.kind_of(question) == "color"
      out.append("nothing" if wrong else truth)
    return out

  def ground(self, images, phrases):
    out = []
    for image, phrase in zip(images, phrases):
      scene = self.scenes[image.tobytes()]
      boxes = shapes.object_boxes(scene, self.probe.size)
      found = grounding.find_objects(scene, phrase)
      if not found:
        out.append(boxes[0] if self.invents else None)
        continue
      index = found[0]
      if self.wrong_pairs and len(scene.objects) == 2:
        index = 1 - index
      out.append(boxes[index])
    return out


def test_questions_and_referring_in_the_report(tmp_path, monkeypatch):
  """question_accuracy and its kinds, referring accuracy by object count
  and for phrases that name nothing, each against a model wrong in one
  known way."""
  def report(**kwargs):
    probe = _OracleProbe(32)
    model = _AskingModel(probe, **kwargs)
    monkeypatch.setattr(probe_lib, "get_probe", lambda *a, **k: probe)
    for doc in (documents_lib.make_document(documents_lib.SPLIT_SEEDS["test"],
                                            i, kinds=(kind,))
                for kind in ("image_caption", "edit") for i in range(20)):
      for scene in doc.scenes[:2]:
        probe.render(scene)
    return interleaved_eval.evaluate_generation(
        model, str(tmp_path), num_prompts=4, num_captions=4, num_edits=4,
        batch_size=8, num_questions=30, num_referring=30)

  right = report()
  assert right["question_accuracy"] == 1.0
  assert right["referring_accuracy"] == 1.0
  # The exact boxes beat the training answers' 16x16 location cells.
  assert 0.5 < right["referring_ceiling"] <= 1.0
  assert right["referring_absent_accuracy"] == 1.0
  assert (right["referring_accuracy_single"]
          == right["referring_accuracy_pair"] == 1.0)
  verdicts = _verdicts(tmp_path)
  asked = [v for v in verdicts if v["task"] == "question"]
  refers = [v for v in verdicts if v["task"] == "refer"]
  assert len(asked) == len(refers) == 30
  assert 0 < sum(not v["named"] for v in refers) < 30  # absent phrases too

  kinds = [questions_lib.kind_of(v["question"]) for v in asked]
  colours = report(wrong_colours=True)
  assert "color" in kinds
  assert colours["question_accuracy_color"] == 0.0
  assert colours["question_accuracy"] == pytest.approx(
      1 - kinds.count("color") / 30)
  assert all(colours[f"question_accuracy_{k}"] == 1.0
             for k in set(kinds) - {"color"})

  pairs = report(wrong_pairs=True)
  assert pairs["referring_accuracy_single"] == 1.0
  assert pairs["referring_accuracy_pair"] == 0.0
  assert pairs["referring_absent_accuracy"] == 1.0
  assert report(invents=True)["referring_absent_accuracy"] == 0.0
