"""Tests for the shapes probe: scoring logic, training, Frechet distance."""
import math
import os

import numpy as np
import pytest

from unimm.data import shapes
from unimm.evaluation import probe as probe_lib
from unimm.evaluation.probe import PredictedObject, PredictedScene


def _found(*objects):
  return PredictedScene(tuple(PredictedObject(*o) for o in objects))


def _score(caption, *objects):
  parsed = shapes.parse_caption(caption)
  assert parsed is not None, caption
  return probe_lib.score_prompt(parsed, _found(*objects))


def _perfect(scene):
  return PredictedScene(tuple(
      PredictedObject(o.shape, o.color, o.size, o.cell)
      for o in sorted(scene.objects, key=lambda o: o.cell)))


# ---------------------------------------------------------------------------
# Scoring on hand-built predictions.


def test_single_object_right():
  result = _score("a big red circle at the top left",
                  ("circle", "red", "big", (0, 0)))
  assert result == {"shape": True, "color": True, "size": True,
                    "position": True, "count": True, "correct": True}


def test_single_object_wrong_colour():
  result = _score("a big red circle at the top left",
                  ("circle", "blue", "big", (0, 0)))
  assert not result["color"] and not result["correct"]
  assert result["shape"] and result["size"] and result["position"]


def test_unstated_attributes_are_skipped():
  # Template "{a0} {c0} {s0} {l0}" states no size; "{a0} {z0} {c0} {s0}"
  # states no cell.
  no_size = _score("a red circle in the center",
                   ("circle", "red", "small", (1, 1)))
  assert "size" not in no_size and no_size["correct"]
  no_cell = _score("a small red circle", ("circle", "red", "small", (2, 2)))
  assert "position" not in no_cell and no_cell["correct"]
  assert "relation" not in no_cell


def test_extra_or_missing_object_fails_count():
  extra = _score("a small red circle", ("circle", "red", "small", (0, 0)),
                 ("square", "blue", "big", (2, 2)))
  assert extra["shape"] and extra["color"] and extra["size"]
  assert not extra["count"] and not extra["correct"]
  nothing = _score("a small red circle")
  assert not nothing["shape"] and not nothing["count"]


def test_pair_right_in_any_found_order():
  caption = "a red circle to the left of a blue square"
  # Found objects come in row-major cell order: the square first here.
  result = _score(caption, ("square", "blue", "big", (0, 1)),
                  ("circle", "red", "small", (1, 0)))
  assert result == {"shape": True, "color": True, "relation": True,
                    "count": True, "correct": True}


def test_pair_wrong_relation():
  result = _score("a red circle to the left of a blue square",
                  ("square", "blue", "big", (1, 0)),
                  ("circle", "red", "small", (1, 2)))
  assert result["shape"] and result["color"] and result["count"]
  assert not result["relation"] and not result["correct"]


def test_pair_missing_object_and_partial_size():
  # Only the second object states a size.
  caption = "a red circle above a big blue square"
  result = _score(caption, ("circle", "red", "small", (0, 1)))
  assert not result["shape"] and not result["relation"]
  assert not result["count"] and not result["correct"]
  result = _score(caption, ("circle", "red", "small", (0, 1)),
                  ("square", "blue", "big", (2, 1)))
  assert result["size"] and result["correct"]
  result = _score(caption, ("circle", "red", "big", (0, 1)),
                  ("square", "blue", "small", (2, 1)))
  assert not result["size"] and result["relation"]


def test_pair_positions_without_relation():
  caption = "a big red circle at the top left and a small blue square on the right"
  right = _score(caption, ("circle", "red", "big", (0, 0)),
                 ("square", "blue", "small", (1, 2)))
  assert "relation" not in right and right["position"] and right["correct"]
  wrong = _score(caption, ("circle", "red", "big", (0, 1)),
                 ("square", "blue", "small", (1, 2)))
  assert not wrong["position"] and not wrong["correct"]


def test_score_predictions_aggregates_and_skips_unstated():
  prompts = probe_lib.fixed_prompt_set(40, 40, seed=7)
  captions = [c for c, _ in prompts]
  perfect = [_perfect(s) for _, s in prompts]
  result = probe_lib.score_predictions(captions, perfect)
  assert result["num_single"] == 40 and result["num_pair"] == 40
  for name, value in result.items():
    if name.endswith("accuracy"):
      assert value == 1.0, name

  # Recolour the first object of every prompt: every prompt fails colour.
  wrong = [PredictedScene((
      PredictedObject(p.objects[0].shape,
                      shapes.COLORS[(shapes.COLORS.index(p.objects[0].color)
                                     + 1) % len(shapes.COLORS)],
                      p.objects[0].size, p.objects[0].cell),) + p.objects[1:])
           for p in perfect]
  result = probe_lib.score_predictions(captions, wrong)
  assert result["color_accuracy"] == 0.0 and result["prompt_accuracy"] == 0.0
  assert result["count_accuracy"] == 1.0 and result["size_accuracy"] == 1.0

  single_only = probe_lib.score_predictions(captions[:3], perfect[:3])
  assert math.isnan(single_only["prompt_accuracy_pair"])
  assert math.isnan(single_only["relation_accuracy"])

  with pytest.raises(ValueError, match="not a shapes caption"):
    probe_lib.score_predictions(["a photo of a dog"], perfect[:1])
  with pytest.raises(ValueError, match="one image per prompt"):
    probe_lib.score_predictions(captions[:2], perfect[:1])


def test_fixed_prompt_set_is_deterministic_and_parsable():
  prompts = probe_lib.fixed_prompt_set(30, 30)
  assert prompts == probe_lib.fixed_prompt_set(30, 30)
  assert probe_lib.fixed_prompt_set(10, 10) == prompts[:10] + prompts[30:40]
  assert prompts != probe_lib.fixed_prompt_set(30, 30, seed=1)
  counts = [len(scene.objects) for _, scene in prompts]
  assert counts == [1] * 30 + [2] * 30
  templates = set()
  for caption, scene in prompts:
    parsed = shapes.parse_caption(caption)
    assert len(parsed.objects) == len(scene.objects)
    templates.add((len(scene.objects), parsed.template))
  assert len(templates) >= 10  # of the 12 templates


# ---------------------------------------------------------------------------
# Frechet distance.


def test_frechet_distance_zero_for_identical_and_grows_with_shift():
  rng = np.random.default_rng(0)
  a = rng.normal(size=(500, 8))
  assert abs(probe_lib.frechet_distance(a, a)) < 1e-6
  shifts = [0.5, 1.0, 2.0]
  distances = [probe_lib.frechet_distance(a, a + s) for s in shifts]
  # A pure mean shift by s in 8 dimensions: d = 8 s^2 exactly.
  np.testing.assert_allclose(distances, [8 * s * s for s in shifts],
                             rtol=1e-6)
  # Scaling the covariance: sum (sigma_a - sigma_b)^2 for diagonal ones.
  b = rng.normal(size=(20_000, 2)) * [1.0, 3.0]
  c = rng.normal(size=(20_000, 2)) * [2.0, 3.0]
  assert abs(probe_lib.frechet_distance(b, c) - 1.0) < 0.1


def test_frechet_distance_near_singular_covariance():
  rng = np.random.default_rng(1)
  # 10 samples in 32 dimensions: rank-deficient covariances.
  a, b = rng.normal(size=(10, 32)), rng.normal(size=(10, 32))
  distance = probe_lib.frechet_distance(a, b)
  assert np.isfinite(distance) and distance > 0
  assert abs(probe_lib.frechet_distance(a, a)) < 1e-4
  with pytest.raises(ValueError, match="same F"):
    probe_lib.frechet_distance(a, b[:, :5])
  with pytest.raises(ValueError, match="at least 2"):
    probe_lib.frechet_distance(a[:1], b)


# ---------------------------------------------------------------------------
# The probe network.


def test_cell_crops_contain_their_cells():
  for size in (32, 64, 100, 256):
    side, starts = probe_lib.cell_crops(size)
    for k, start in enumerate(starts):
      lo, hi = k * size / shapes.GRID, (k + 1) * size / shapes.GRID
      assert start <= lo and start + side >= hi and start + side <= size


def test_preprocess_resizes_and_validates():
  scene = shapes.generate(1, 5)[2][0]
  small = shapes.render(scene, 32)[None]
  large = shapes.render(scene, 64)[None]
  odd = shapes.render(scene, 48)[None]
  x32 = probe_lib.preprocess(small, 32)
  # Box-downsampled 64 px render = 32 px render up to rounding.
  assert np.abs(probe_lib.preprocess(large, 32) - x32).max() <= 1.01 / 127.5
  assert np.abs(probe_lib.preprocess(odd, 32) - x32).mean() < 0.05
  with pytest.raises(ValueError, match="uint8"):
    probe_lib.preprocess(small.astype(np.float32), 32)
  with pytest.raises(ValueError, match="square"):
    probe_lib.preprocess(small[:, :, :20], 32)


def test_blur_crops_per_crop_sigma():
  """sigma 0 keeps a crop; sigma > 0 spreads an impulse into the separable
  normalised Gaussian (mass kept, symmetric); constants stay constant."""
  x = np.zeros((3, 9, 9, 3), np.float32)
  x[:2, 4, 4] = 1.0
  x[2] = 0.25
  out = np.asarray(probe_lib.blur_crops(x, np.array([0.0, 1.0, 1.0])))
  np.testing.assert_allclose(out[0], x[0], atol=1e-6)
  taps = np.exp(-np.arange(-2, 3) ** 2 / 2.0)
  taps /= taps.sum()
  np.testing.assert_allclose(out[1, 2:7, 2:7, 0], np.outer(taps, taps),
                             rtol=1e-5)
  assert abs(out[1].sum() - 3.0) < 1e-5  # one unit per channel
  np.testing.assert_allclose(out[1], out[1][::-1, ::-1], atol=1e-7)
  np.testing.assert_allclose(out[2], 0.25, atol=1e-6)  # edges replicated


@pytest.fixture(scope="module")
def brief_probe():
  """A probe trained for a few seconds (tiny width, 200 steps)."""
  return probe_lib.train_probe(num_train=1000, steps=200, batch_size=64,
                               learning_rate=2e-3, width=8,
                               cell_feature_dim=32, log_every=50)


def test_brief_training_beats_chance(brief_probe):
  accuracy = brief_probe.evaluate_heldout(num=300)
  # Chance: 1/6 shapes, 1/8 colours, 1/2 sizes, 7/9 cells empty.
  assert accuracy["occupancy_accuracy"] > 0.97
  assert accuracy["cell_accuracy"] > 0.9
  assert accuracy["color_accuracy"] > 0.6
  assert accuracy["shape_accuracy"] > 0.25  # the slowest to learn
  assert accuracy["size_accuracy"] > 0.75


def test_probe_reads_renders_of_fixed_prompts(brief_probe):
  prompts = probe_lib.fixed_prompt_set(50, 50, seed=3)
  images = np.stack([shapes.render(s, 32) for _, s in prompts])
  result = probe_lib.prompt_accuracy([c for c, _ in prompts], images,
                                     probe=brief_probe)
  assert result["count_accuracy"] > 0.8
  assert result["position_accuracy"] > 0.8
  assert result["color_accuracy"] > 0.5
  # The same renders at 64 px are read (after box resizing) the same way.
  images_64 = np.stack([shapes.render(s, 64) for _, s in prompts[:20]])
  same = [a == b for a, b in zip(brief_probe.predict(images_64),
                                 brief_probe.predict(images[:20]))]
  assert np.mean(same) >= 0.9


def test_features_and_probe_fd(brief_probe):
  real, _, _ = shapes.generate(200, 123)
  other, _, _ = shapes.generate(200, 456)
  features = brief_probe.features(real)
  assert features.shape == (200, brief_probe.net.feature_dim)
  assert features.dtype == np.float32
  assert probe_lib.probe_fd(real, real, probe=brief_probe) < 1e-3
  same_world = probe_lib.probe_fd(real, other, probe=brief_probe)
  # A shifted distribution: colours inverted.
  shifted = probe_lib.probe_fd(real, 255 - other, probe=brief_probe)
  assert shifted > 5 * same_world


def test_save_load_round_trip_and_cache(brief_probe, tmp_path):
  images, _, _ = shapes.generate(40, 99)
  brief_probe.save(str(tmp_path / "p"))
  loaded = probe_lib.Probe.load(str(tmp_path / "p"))
  assert loaded.net == brief_probe.net
  assert loaded.predict(images) == brief_probe.predict(images)
  np.testing.assert_array_equal(loaded.features(images),
                                brief_probe.features(images))
  # get_probe finds a probe saved under its cache layout (no training).
  cached = tmp_path / "cache" / f"v{probe_lib.PROBE_VERSION}_32px"
  brief_probe.save(str(cached))
  got = probe_lib.get_probe(32, cache_dir=str(tmp_path / "cache"))
  assert got.predict(images) == brief_probe.predict(images)
  # A probe of another version is refused.
  (tmp_path / "p" / "probe.json").write_text(
      '{"version": -1, "image_size": 32, "width": 8, "cell_feature_dim": 32}')
  with pytest.raises(ValueError, match="version"):
    probe_lib.Probe.load(str(tmp_path / "p"))


def test_get_probe_trains_once_saves_and_reloads(brief_probe, tmp_path,
                                                 monkeypatch):
  """Nothing cached: get_probe trains (train_probe stands in with the brief
  probe), saves under $UNIMM_DATA_DIR/probe/v{PROBE_VERSION}_32px and keeps
  it for the process; a new process loads the saved files, training
  nothing."""
  images, _, _ = shapes.generate(40, 98)
  trained = []

  def train(**kwargs):
    trained.append(kwargs)
    return brief_probe

  monkeypatch.setenv("UNIMM_DATA_DIR", str(tmp_path))
  monkeypatch.setattr(probe_lib, "train_probe", train)
  # lru_cache'd per process: forget probes other tests had loaded.
  probe_lib._cached_probe.cache_clear()  # pylint: disable=protected-access
  try:
    got = probe_lib.get_probe(32)
    assert trained == [{"image_size": 32}]
    assert got is brief_probe
    directory = tmp_path / "probe" / f"v{probe_lib.PROBE_VERSION}_32px"
    assert sorted(os.listdir(directory)) == ["params.npz", "probe.json"]
    assert os.listdir(tmp_path / "probe") == [directory.name]  # no tmp left
    assert probe_lib.get_probe(32) is got and len(trained) == 1

    def no_training(**kwargs):
      raise AssertionError(f"trained again ({kwargs}) with a saved probe")

    monkeypatch.setattr(probe_lib, "train_probe", no_training)
    probe_lib._cached_probe.cache_clear()  # pylint: disable=protected-access
    loaded = probe_lib.get_probe(32)
    assert loaded is not got and loaded.net == brief_probe.net
    assert loaded.predict(images) == brief_probe.predict(images)
  finally:
    probe_lib._cached_probe.cache_clear()  # pylint: disable=protected-access


@pytest.mark.slow
def test_full_probe_reads_renders_perfectly(tmp_path):
  """The default recipe (train_probe's defaults, as get_probe trains it):
  renders score ~1 against their captions. Minutes of CPU: run with
  --run-slow (docs/testing.md)."""
  probe = probe_lib.get_probe(32, cache_dir=str(tmp_path))
  prompts = probe_lib.fixed_prompt_set(100, 100)
  images = np.stack([shapes.render(s, 32) for _, s in prompts])
  result = probe_lib.prompt_accuracy([c for c, _ in prompts], images,
                                     probe=probe)
  assert result["prompt_accuracy_single"] >= 0.97
  assert result["prompt_accuracy_pair"] >= 0.95
  for name in ("shape", "color", "size", "position", "relation", "count"):
    assert result[f"{name}_accuracy"] >= 0.97, name
