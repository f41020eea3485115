"""Tests for unimm/data/tfds_shapes.py: the offline unimm_shapes builder."""
import json
import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from unimm.data import shapes
from unimm.data import tfds_shapes

CHUNK = 200  # smaller than the default so the 512 train examples span chunks


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(tfds_shapes, "CHUNK_SIZE", CHUNK)
    assert tfds_shapes.build_shapes(32, data_dir, variant="small") == data_dir
  return data_dir


def _source(data_dir, split):
  return tfds.data_source("unimm_shapes/32_small", split=split,
                          data_dir=data_dir, download=False)


def test_split_sizes_and_decoding(data_dir):
  sizes = {split: len(_source(data_dir, split))
           for split in ("train", "validation", "test")}
  assert sizes == {"train": 512, "validation": 128, "test": 128}
  example = _source(data_dir, "validation")[5]
  assert example["image"].shape == (32, 32, 3)
  assert example["image"].dtype == np.uint8
  assert isinstance(example["caption"], (str, bytes)) and example["caption"]
  scene = json.loads(example["scene"])
  assert set(scene) >= {"objects", "relation"}
  assert 1 <= len(scene["objects"]) <= 2


@pytest.mark.parametrize("index", [0, 7, CHUNK - 1, CHUNK, 511])
def test_examples_match_shapes_generate(data_dir, index):
  chunk, offset = divmod(index, CHUNK)
  images, captions, scenes = shapes.generate(
      offset + 1, seed=tfds_shapes.chunk_seed("train", chunk), image_size=32)
  example = _source(data_dir, "train")[index]
  np.testing.assert_array_equal(example["image"], images[offset])  # lossless
  caption = example["caption"]
  caption = caption.decode() if isinstance(caption, bytes) else caption
  assert caption == captions[offset]
  scene = shapes.scene_from_json(example["scene"])
  assert scene == scenes[offset]
  assert scene.objects[0].offset == scenes[offset].objects[0].offset


def test_splits_are_generated_from_different_seeds(data_dir):
  train, validation = _source(data_dir, "train"), _source(data_dir, "validation")
  assert not np.array_equal(
      np.stack([train[i]["image"] for i in range(8)]),
      np.stack([validation[i]["image"] for i in range(8)]))
  seeds = {tfds_shapes.chunk_seed(split, 0) for split in tfds_shapes.SPLITS}
  assert len(seeds) == 3


def test_build_is_idempotent(data_dir):
  builder = tfds_shapes.shapes_builder(32, data_dir, variant="small")
  files = sorted(os.listdir(builder.data_dir))
  mtimes = [os.path.getmtime(os.path.join(builder.data_dir, f)) for f in files]
  assert tfds_shapes.build_shapes(32, data_dir, variant="small") == data_dir
  assert sorted(os.listdir(builder.data_dir)) == files
  assert [os.path.getmtime(os.path.join(builder.data_dir, f))
          for f in files] == mtimes


def test_configs_and_default_data_dir(monkeypatch, tmp_path):
  names = {config.name for config in tfds_shapes.UnimmShapes.BUILDER_CONFIGS}
  assert {"32", "64", "128", "256", "32_small", "256_small",
          "32_large"} <= names
  with pytest.raises(ValueError, match="config.data.image_size"):
    tfds_shapes.config_name(48)
  with pytest.raises(ValueError, match="large shapes data set has no 64x64"):
    tfds_shapes.config_name(64, "large")
  with pytest.raises(ValueError, match="Unknown shapes variant 'huge'"):
    tfds_shapes.config_name(32, "huge")
  monkeypatch.setenv("UNIMM_DATA_DIR", str(tmp_path))
  assert tfds_shapes.default_data_dir() == str(tmp_path)
  monkeypatch.delenv("UNIMM_DATA_DIR")
  assert tfds_shapes.default_data_dir().endswith(
      os.path.join(".cache", "unimm", "tfds"))


def test_custom_config_rendered_by_worker_processes(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_shapes, "CHUNK_SIZE", 10)
  monkeypatch.setattr(tfds_shapes, "_PARALLEL_MIN_EXAMPLES", 30)
  monkeypatch.setattr(tfds_shapes.os, "cpu_count", lambda: 2)
  config = tfds_shapes.ShapesConfig(
      name="16_custom", image_size=16, num_train=35, num_validation=4,
      num_test=4)
  builder = tfds_shapes.UnimmShapes(config=config, data_dir=str(tmp_path))
  builder.download_and_prepare()
  train = builder.as_data_source("train")
  assert len(train) == 35  # 4 chunks in 2 spawned workers, stored in order
  images, _, _ = shapes.generate(
      5, seed=tfds_shapes.chunk_seed("train", 3), image_size=16)
  for offset in range(5):
    np.testing.assert_array_equal(train[30 + offset]["image"], images[offset])


def test_large_train_extends_the_full_one(tmp_path, monkeypatch):
  """32_large's training split starts with 32's examples (same chunk seeds)
  and goes on with new ones; its held-out splits are 32's."""
  monkeypatch.setattr(tfds_shapes, "CHUNK_SIZE", 4)
  monkeypatch.setattr(tfds_shapes, "_PARALLEL_MIN_EXAMPLES", 10**9)
  sources = {}
  # Custom names (TFDS refuses a custom config named like a registered
  # one); the examples depend on the split and index only.
  for name, num_train in (("full_8", 8), ("large_16", 16)):
    config = tfds_shapes.ShapesConfig(
        name=name, image_size=32, num_train=num_train, num_validation=4,
        num_test=4)
    builder = tfds_shapes.UnimmShapes(config=config,
                                      data_dir=str(tmp_path / name))
    builder.download_and_prepare()
    sources[name] = {split: builder.as_data_source(split)
                     for split in ("train", "validation")}
  full, large = sources["full_8"], sources["large_16"]
  assert len(large["train"]) == 2 * len(full["train"])
  for i in range(8):
    np.testing.assert_array_equal(large["train"][i]["image"],
                                  full["train"][i]["image"])
  for i in range(4):
    np.testing.assert_array_equal(large["validation"][i]["image"],
                                  full["validation"][i]["image"])
  assert len({large["train"][i]["caption"] for i in range(16)}) > 8
  large_config = {c.name: c for c in tfds_shapes.UnimmShapes.BUILDER_CONFIGS}
  assert large_config["32_large"].num_train == 500_000
  assert large_config["32_large"].num_validation == 2_000
