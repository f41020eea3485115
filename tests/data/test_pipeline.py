"""Tests for unimm/data/pipeline.py: shuffle, shard, batch, checkpoint."""
import json
import itertools

import numpy as np
import pytest

from unimm.data import pipeline

NUM_RECORDS = 50


def _records(num: int = NUM_RECORDS) -> list[dict]:
  return [{"index": np.int64(i), "text": f"record {i}"} for i in range(num)]


def _indices(dataset, num_batches: int | None = None) -> list[list[int]]:
  iterator = iter(dataset)
  if num_batches is not None:
    iterator = itertools.islice(iterator, num_batches)
  return [batch["index"].tolist() for batch in iterator]


def _dataset(**kwargs):
  defaults = dict(batch_size=5, shuffle=True, seed=0, num_epochs=None)
  return pipeline.batched_dataset(_records(), **{**defaults, **kwargs})


def test_batches_have_stacked_arrays_and_object_strings():
  batch = next(iter(_dataset(shuffle=False)))
  assert batch["index"].shape == (5,) and batch["index"].dtype == np.int64
  assert batch["text"].dtype == object
  assert list(batch["text"]) == [f"record {i}" for i in range(5)]


def test_shuffle_is_deterministic_by_seed():
  first = _indices(_dataset(seed=3), 10)
  assert first == _indices(_dataset(seed=3), 10)
  assert first != _indices(_dataset(seed=4), 10)
  assert first != _indices(_dataset(shuffle=False), 10)


def test_epochs_are_permutations_reshuffled_and_finite():
  batches = _indices(_dataset(num_epochs=2))
  assert len(batches) == 2 * NUM_RECORDS // 5
  epoch_1 = sum(batches[:10], [])
  epoch_2 = sum(batches[10:], [])
  assert sorted(epoch_1) == sorted(epoch_2) == list(range(NUM_RECORDS))
  assert epoch_1 != epoch_2  # a new order every epoch


def test_drop_remainder():
  dropped = _indices(_dataset(batch_size=8, num_epochs=1))
  assert [len(b) for b in dropped] == [8] * 6
  kept = _indices(_dataset(batch_size=8, num_epochs=1, drop_remainder=False))
  assert [len(b) for b in kept] == [8] * 6 + [2]


def test_host_shards_are_disjoint_equal_and_cover():
  shards = [sum(_indices(_dataset(num_epochs=1, batch_size=4,
                                  process_index=p, process_count=3)), [])
            for p in range(3)]
  assert [len(s) for s in shards] == [16] * 3
  union = set().union(*shards)
  assert len(union) == 48  # disjoint; 50 // 3 * 3 records are used
  assert union <= set(range(NUM_RECORDS))
  # With process_count 1 every record is read.
  assert sorted(sum(_indices(_dataset(num_epochs=1)), [])) == list(
      range(NUM_RECORDS))


def test_restored_iterator_continues_with_the_same_batches():
  dataset = _dataset(batch_size=8)
  iterator = iter(dataset)
  for _ in range(5):
    next(iterator)
  state = iterator.get_state()
  # The next 10 batches cross the epoch boundary (50 records, 8 per batch).
  expected = [next(iterator)["index"].tolist() for _ in range(10)]
  restored = iter(_dataset(batch_size=8))
  restored.set_state(state)
  assert [next(restored)["index"].tolist() for _ in range(10)] == expected
  # State round-trips through JSON-compatible checkpoint formats.
  assert json.loads(json.dumps(state)) == state


def test_transform_is_applied_per_record():
  dataset = _dataset(shuffle=False, transform=lambda r: {"double":
                                                         2 * r["index"]})
  assert next(iter(dataset))["double"].tolist() == [0, 2, 4, 6, 8]


def test_worker_process_gives_the_same_batches():
  expected = _indices(_dataset(num_epochs=1))
  assert _indices(_dataset(num_epochs=1, worker_count=1)) == expected


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), "config.data.batch_size"),
    (dict(process_index=2, process_count=2), "process_index"),
    (dict(num_epochs=1, batch_size=64), "config.data.batch_size"),
    (dict(num_epochs=0), "num_epochs"),
])
def test_bad_arguments_raise(kwargs, match):
  with pytest.raises(ValueError, match=match):
    _dataset(**kwargs)


# ----------------------------------------------------------------------------
# image_text_dataset over the embedded shapes data set.
# ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


def _shapes(data_dir, **kwargs):
  defaults = dict(batch_size=16, image_size=32, shuffle=True, seed=0,
                  data_dir=data_dir)
  return pipeline.image_text_dataset("shapes_small", "train",
                                     **{**defaults, **kwargs})


def test_shapes_batches(shapes_dir):
  batch = next(iter(_shapes(shapes_dir)))
  assert batch["image"].shape == (16, 32, 32, 3)
  assert batch["image"].dtype == np.uint8
  assert batch["caption"].shape == (16,) and batch["caption"].dtype == object
  assert all(isinstance(c, str) and c for c in batch["caption"])
  scene = json.loads(batch["scene"][0])
  assert scene["objects"]
  # Deterministic by seed; the validation split is held out.
  again = next(iter(_shapes(shapes_dir)))
  np.testing.assert_array_equal(batch["image"], again["image"])
  validation = pipeline.image_text_dataset(
      "shapes_small", "validation", batch_size=128, image_size=32,
      shuffle=False, seed=0, num_epochs=1, data_dir=shapes_dir)
  assert len(list(validation)) == 1


def test_shapes_checkpoint_round_trip(shapes_dir):
  iterator = iter(_shapes(shapes_dir, process_index=1, process_count=2))
  next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(3)]
  restored = iter(_shapes(shapes_dir, process_index=1, process_count=2))
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert list(got["caption"]) == list(want["caption"])


def test_in_memory_source_gives_the_same_batches_and_resumes(shapes_dir):
  # Read once into memory (the tokenizer's training split): the same
  # batches as decoding every step, across epochs, and the same iterator
  # state; records are read in chunks smaller than the split here.
  kwargs = dict(process_index=1, process_count=2, batch_size=48)
  plain = iter(_shapes(shapes_dir, **kwargs))
  cached = iter(_shapes(shapes_dir, in_memory=True, **kwargs))
  for _ in range(8):  # 256 records per host: past one epoch
    want, got = next(plain), next(cached)
    np.testing.assert_array_equal(got["image"], want["image"])
    assert list(got["caption"]) == list(want["caption"])
    assert list(got["scene"]) == list(want["scene"])
  state = cached.get_state()
  expected = next(plain)
  restored = iter(_shapes(shapes_dir, in_memory=True, **kwargs))
  restored.set_state(state)
  np.testing.assert_array_equal(next(restored)["image"], expected["image"])
  source, _ = pipeline.image_text_source("shapes_small", "train",
                                         image_size=32, data_dir=shapes_dir)
  memory = pipeline.InMemorySource(source, chunk=100)
  assert len(memory) == len(source)
  np.testing.assert_array_equal(memory[len(source) - 1]["image"],
                                source[len(source) - 1]["image"])


def test_shapes_bad_settings_name_the_fix(shapes_dir, tmp_path):
  with pytest.raises(ValueError, match="config.data.image_size"):
    _shapes(shapes_dir, image_size=48)
  with pytest.raises(ValueError, match="unimm.tools.convert"):
    pipeline.image_text_dataset(
        str(tmp_path / "nowhere"), "train", batch_size=2, image_size=32,
        shuffle=False, seed=0)
  with pytest.raises(ValueError, match="'validaton'"):
    pipeline.image_text_dataset(
        "shapes_small", "validaton", batch_size=2, image_size=32,
        shuffle=False, seed=0, data_dir=shapes_dir)
