"""Tests for unimm/data/shapes.py: the procedural shapes world."""
import dataclasses
import itertools
import json
import re
import time

import numpy as np
import pytest

from unimm.data import shapes


def random_scenes(num, seed=0, num_objects=(1, 2)):
  return [shapes.scene_from_rng(np.random.default_rng([seed, i]), num_objects)
          for i in range(num)]


def nearest_color(rgb):
  names = list(shapes.PALETTE)
  palette = np.asarray([shapes.PALETTE[n] for n in names], np.float32)
  return names[int(np.argmin(np.linalg.norm(palette - rgb, axis=-1)))]


def test_generate_is_deterministic_by_seed():
  a_images, a_captions, a_scenes = shapes.generate(12, seed=3)
  b_images, b_captions, b_scenes = shapes.generate(12, seed=3)
  np.testing.assert_array_equal(a_images, b_images)
  assert a_captions == b_captions and a_scenes == b_scenes
  assert [s.objects[0].offset for s in a_scenes] == [
      s.objects[0].offset for s in b_scenes]
  c_images, c_captions, _ = shapes.generate(12, seed=4)
  assert not np.array_equal(a_images, c_images)
  assert a_captions != c_captions


def test_example_does_not_depend_on_num():
  small = shapes.generate(3, seed=7, image_size=64)
  large = shapes.generate(10, seed=7, image_size=64)
  np.testing.assert_array_equal(small[0], large[0][:3])
  assert small[1] == large[1][:3] and small[2] == large[2][:3]
  empty_images, empty_captions, _ = shapes.generate(0, seed=7)
  assert empty_images.shape == (0, 32, 32, 3) and not empty_captions


@pytest.mark.parametrize("image_size", [32, 64, 128, 256])
def test_image_shape_and_dtype(image_size):
  images, captions, scenes = shapes.generate(2, seed=1, image_size=image_size)
  assert images.shape == (2, image_size, image_size, 3)
  assert images.dtype == np.uint8
  assert len(captions) == len(scenes) == 2
  np.testing.assert_array_equal(images[0], shapes.render(scenes[0],
                                                         image_size))


def test_num_objects_int_or_tuple():
  _, _, ones = shapes.generate(20, seed=0, num_objects=1)
  assert all(len(s.objects) == 1 and s.relation is None for s in ones)
  _, _, twos = shapes.generate(20, seed=0, num_objects=(2,))
  assert all(len(s.objects) == 2 and s.relation in shapes.RELATIONS
             for s in twos)
  counts = {len(s.objects) for s in random_scenes(60, num_objects=(1, 2))}
  assert counts == {1, 2}


def test_relations_hold_and_are_dominant():
  for scene in random_scenes(400, seed=1, num_objects=2):
    (row0, col0), (row1, col1) = (o.cell for o in scene.objects)
    assert (row0, col0) != (row1, col1)
    assert shapes.relation_holds(scene.relation, (row0, col0), (row1, col1))
    horizontal = scene.relation in ("left of", "right of")
    major, minor = ((abs(col0 - col1), abs(row0 - row1)) if horizontal
                    else (abs(row0 - row1), abs(col0 - col1)))
    assert minor < major  # the stated relation is the obvious one
    first, second = scene.objects
    assert (first.shape, first.color) != (second.shape, second.color)
  assert shapes.relation_holds("left of", (2, 0), (0, 1))
  assert not shapes.relation_holds("above", (2, 0), (0, 1))
  assert shapes.true_relations((0, 0), (2, 2)) == ("left of", "above")


def test_every_attribute_appears():
  scenes = random_scenes(500, seed=2)
  objects = [o for s in scenes for o in s.objects]
  assert {o.shape for o in objects} == set(shapes.SHAPES)
  assert {o.color for o in objects} == set(shapes.PALETTE)
  assert {o.size for o in objects} == set(shapes.SIZES)
  assert {o.cell for o in objects} == set(shapes.CELLS)
  assert {s.relation for s in scenes} == set(shapes.RELATIONS) | {None}
  assert {s.background for s in scenes} == set(range(len(shapes.BACKGROUNDS)))
  assert len(shapes.SHAPES) >= 6 and len(shapes.PALETTE) >= 8


def test_palette_is_far_apart_and_far_from_backgrounds():
  palette = {k: np.asarray(v, float) for k, v in shapes.PALETTE.items()}
  for a, b in itertools.combinations(palette, 2):
    assert np.linalg.norm(palette[a] - palette[b]) >= 100, (a, b)
  for _, start, end, _ in shapes.BACKGROUNDS:
    for rgb in palette.values():
      assert min(np.linalg.norm(rgb - np.asarray(start, float)),
                 np.linalg.norm(rgb - np.asarray(end, float))) >= 120
    # Low contrast: the gradient spans at most ~1/8 of the range.
    assert np.max(np.abs(np.subtract(start, end))) <= 32


def _words(text):
  return set(text.replace(",", "").split())


@pytest.mark.parametrize("count", [1, 2])
def test_captions_mention_the_attributes(count):
  templates = shapes.TEMPLATES[count]
  for i, scene in enumerate(random_scenes(60, seed=3, num_objects=count)):
    for index, template in enumerate(templates):
      text = shapes.caption(scene, index)
      assert "{" not in text and text == text.strip() and "  " not in text
      assert not re.search(r"\ba [aeiou]", text), text  # "an orange ..."
      for k, obj in enumerate(scene.objects):
        assert {obj.color, obj.shape} <= _words(text), text
        if f"{{z{k}}}" in template:
          assert obj.size in _words(text), text
        if f"{{l{k}}}" in template:
          assert shapes.LOCATION_PHRASES[obj.cell] in text, text
      if "{r}" in template:
        assert shapes.RELATION_PHRASES[scene.relation] in text, text
    assert shapes.caption(scene) == shapes.caption(scene)
    assert shapes.caption(scene) in {shapes.caption(scene, t)
                                     for t in range(len(templates))}
    if i == 0:
      with pytest.raises(ValueError, match="template"):
        shapes.caption(scene, len(templates))


def test_examples_of_captions():
  red = shapes.Object("circle", "red", "big", (0, 0))
  blue = shapes.Object("square", "blue", "small", (1, 1))
  orange = shapes.Object("star", "orange", "small", (0, 2))
  assert shapes.caption(shapes.Scene((red,)), 0) == (
      "a big red circle at the top left")
  assert shapes.caption(shapes.Scene((blue,)), 0) == (
      "a small blue square in the center")
  assert shapes.caption(shapes.Scene((red, orange), "left of"), 0) == (
      "a red circle to the left of an orange star")
  assert shapes.caption(shapes.Scene((orange, blue), "above"), 2) == (
      "an orange star above a small blue square")


def test_parse_caption_round_trips_every_template():
  for count in (1, 2):
    for scene in random_scenes(150, seed=4, num_objects=count):
      for index, template in enumerate(shapes.TEMPLATES[count]):
        text = shapes.caption(scene, index)
        parsed = shapes.parse_caption(text)
        assert parsed is not None, text
        assert parsed.template == index
        assert len(parsed.objects) == count
        for k, (got, want) in enumerate(zip(parsed.objects, scene.objects)):
          assert (got.shape, got.color) == (want.shape, want.color), text
          assert got.size == (want.size if f"{{z{k}}}" in template
                              else None), text
          assert got.cell == (want.cell if f"{{l{k}}}" in template
                              else None), text
        assert parsed.relation == (scene.relation if "{r}" in template
                                   else None), text
  parsed = shapes.parse_caption("  A Big RED  circle at the top LEFT. ")
  assert parsed.objects == (shapes.ParsedObject("circle", "red", "big",
                                                (0, 0)),)
  for junk in ("", "a dog on a sofa", "a pink hexagon at the top",
               "a big red circle at the top left and more"):
    assert shapes.parse_caption(junk) is None


def test_complete_templates_state_every_attribute_of_every_object():
  for count, index in shapes.COMPLETE_TEMPLATES.items():
    for scene in random_scenes(20, seed=5, num_objects=count):
      parsed = shapes.parse_caption(shapes.caption(scene, index))
      assert [(o.shape, o.color, o.size, o.cell) for o in parsed.objects] == [
          (o.shape, o.color, o.size, o.cell) for o in scene.objects]


def test_rendered_object_has_its_palette_colour():
  for image_size in (32, 128):
    for scene in random_scenes(120, seed=5):
      image = shapes.render(scene, image_size).astype(np.float32)
      for obj in scene.objects:
        alpha, (rows, cols) = shapes.object_coverage(obj, image_size)
        full = image[rows, cols][alpha >= 1.0]  # [P, 3] fully covered pixels
        assert len(full) > 0, obj
        np.testing.assert_allclose(full.mean(0), shapes.PALETTE[obj.color],
                                   atol=1.0)
        # The pixel at the object's centre reads back as its colour.
        x, y = (int(c * image_size) for c in shapes.object_center(obj))
        assert nearest_color(image[y, x]) == obj.color
        # The object stays inside its cell.
        row, col = obj.cell
        cell = image_size / shapes.GRID
        ys, xs = np.nonzero(alpha > 0)
        assert rows.start + ys.min() >= np.floor(row * cell)
        assert rows.start + ys.max() < np.ceil((row + 1) * cell)
        assert cols.start + xs.min() >= np.floor(col * cell)
        assert cols.start + xs.max() < np.ceil((col + 1) * cell)


def test_objects_are_recognisable_at_32():
  cell_area = (32 / shapes.GRID) ** 2
  masks = {}
  for shape in shapes.SHAPES:
    areas = {}
    for size in shapes.SIZES:
      alpha, _ = shapes.object_coverage(
          shapes.Object(shape, "red", size, (1, 1)), 32)
      areas[size] = alpha.sum()
      if size == "big":
        masks[shape] = alpha
    assert areas["big"] >= 0.25 * cell_area, shape
    assert areas["big"] >= 2.0 * areas["small"], shape
  for a, b in itertools.combinations(shapes.SHAPES, 2):
    # Different shapes differ by at least ~6 pixels' worth of coverage.
    assert np.abs(masks[a] - masks[b]).sum() >= 6.0, (a, b)


def test_128_render_downsampled_matches_32_render():
  for scene in random_scenes(100, seed=6):
    small = shapes.render(scene, 32).astype(np.float32)
    large = shapes.render(scene, 128).astype(np.float32)
    down = large.reshape(32, 4, 32, 4, 3).mean(axis=(1, 3))
    # Same 256-point sample grid at both sizes: equal up to rounding.
    assert np.abs(down - small).mean() < 0.5
    assert np.abs(down - small).max() < 4
  # Antialiased: edges get intermediate values, not only object/background.
  image = shapes.render(shapes.Scene(
      (shapes.Object("circle", "white", "big", (1, 1)),), None, 0), 32)
  assert len(np.unique(image[..., 0])) > 5


def test_object_labels():
  scene = shapes.Scene((shapes.Object("star", "cyan", "small", (2, 1)),
                        shapes.Object("cross", "red", "big", (0, 1))),
                       "below", 1)
  labels = shapes.object_labels(scene)
  assert labels["shape"].tolist() == [shapes.SHAPES.index("star"),
                                      shapes.SHAPES.index("cross")]
  assert labels["color"].tolist() == [shapes.COLORS.index("cyan"),
                                      shapes.COLORS.index("red")]
  assert labels["size"].tolist() == [0, 1]
  assert labels["cell"].tolist() == [7, 1]
  assert int(labels["relation"]) == shapes.RELATIONS.index("below")
  single = shapes.Scene((scene.objects[0],))
  padded = shapes.object_labels(single, max_objects=2)
  assert padded["cell"].tolist() == [7, -1]
  assert int(padded["relation"]) == -1 and int(padded["num_objects"]) == 1
  assert all(v.dtype == np.int32 for v in padded.values())
  with pytest.raises(ValueError, match="max_objects"):
    shapes.object_labels(scene, max_objects=1)


def test_scene_json_round_trip():
  for scene in random_scenes(20, seed=8):
    text = json.dumps(dataclasses.asdict(scene))
    restored = shapes.scene_from_json(text)
    assert restored == scene
    np.testing.assert_array_equal(shapes.render(restored, 32),
                                  shapes.render(scene, 32))


def test_bad_input_raises_value_error_naming_the_setting():
  with pytest.raises(ValueError, match="num_objects=3"):
    shapes.generate(2, seed=0, num_objects=3)
  with pytest.raises(ValueError, match="num_objects"):
    shapes.generate(2, seed=0, num_objects=(1, 3))
  with pytest.raises(ValueError, match="image_size=7"):
    shapes.generate(2, seed=0, image_size=7)
  with pytest.raises(ValueError, match="image_size"):
    shapes.render(random_scenes(1)[0], 7)
  with pytest.raises(ValueError, match="seed"):
    shapes.generate(2, seed=-1)
  with pytest.raises(ValueError, match="color 'pink'"):
    shapes.Object("circle", "pink", "big", (0, 0))
  with pytest.raises(ValueError, match="shape 'hexagon'"):
    shapes.Object("hexagon", "red", "big", (0, 0))
  with pytest.raises(ValueError, match="size"):
    shapes.Object("circle", "red", "huge", (0, 0))
  with pytest.raises(ValueError, match="cell"):
    shapes.Object("circle", "red", "big", (3, 0))
  a = shapes.Object("circle", "red", "big", (0, 0))
  b = shapes.Object("square", "blue", "big", (0, 2))
  with pytest.raises(ValueError, match="false"):
    shapes.Scene((a, b), "right of")
  with pytest.raises(ValueError, match="relation"):
    shapes.Scene((a, b), "near")
  with pytest.raises(ValueError, match="different cells"):
    shapes.Scene((a, dataclasses.replace(b, cell=(0, 0))), "left of")
  with pytest.raises(ValueError, match="background"):
    shapes.Scene((a,), None, len(shapes.BACKGROUNDS))


def test_generation_is_fast():
  start = time.perf_counter()
  shapes.generate(300, seed=9, image_size=32)
  per_image = (time.perf_counter() - start) / 300
  assert per_image < 3e-3  # ~0.15 ms on one core; generous for shared CI
