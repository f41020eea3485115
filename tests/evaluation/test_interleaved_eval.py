"""Scoring of interleaved generations against the true scenes."""
from unimm.data import interleaved as documents_lib
from unimm.data import shapes
from unimm.evaluation import interleaved_eval


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
