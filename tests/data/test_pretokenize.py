"""Pre-tokenization: shards hold the frozen tokenizer's ids and the captions'
text ids (every caption of a record); the reader is sharded per host,
shuffled, checkpointable, and draws one caption per example and epoch."""
import collections
import itertools
import json
import os
import sys

from absl import flags
from flax import serialization
import numpy as np
from PIL import Image
import pytest

from unimm import api
from unimm.data import convert
from unimm.data import pipeline
from unimm.data import pretokenize
from unimm.data import shapes
from unimm.tokenizers import text as text_lib
from unimm.tools import pretokenize as pretokenize_tool

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "..", "configs")
NUM_EXAMPLES = 40
TEXT_LENGTH = 8  # short: some shapes captions are truncated on purpose


def tiny_tokenizer_config(data_dir: str):
  """A tiny ViT-VQGAN: 32x32 images, 8x8 patches -> 4x4 tokens, 16 codes."""
  sys.path.insert(0, os.path.abspath(CONFIGS))
  import vit_vqgan_shapes  # pylint: disable=g-import-not-at-top
  config = vit_vqgan_shapes.get_config("size=tiny,steps=1,batch=8")
  config.model.update(image_size=32, patch_size=8, num_codes=16, code_dim=4,
                      encoder_num_layers=1, decoder_num_layers=1,
                      encoder_embed_dim=16, decoder_embed_dim=16,
                      encoder_mlp_dim=32, decoder_mlp_dim=32)
  config.loss.update(adversarial_weight=0.0, latent_buffer_size=16,
                     restart_every=0)
  config.discriminator.update(channel_multiplier=2, max_channels=4)
  config.data.update(source="shapes_small", data_dir=data_dir)
  return config


def _random_leaf(path, leaf, rng):
  """A plausible random value for one state leaf (no compile needed)."""
  name = str(path[-1]) if path else ""
  if not np.issubdtype(leaf.dtype, np.floating):
    return np.zeros(leaf.shape, leaf.dtype)
  if "scale" in name:
    return np.ones(leaf.shape, leaf.dtype)
  if "bias" in name or leaf.ndim < 2:
    return np.zeros(leaf.shape, leaf.dtype)
  fan_in = leaf.shape[-2] if leaf.ndim >= 2 else 1
  return (rng.standard_normal(leaf.shape) / np.sqrt(fan_in)).astype(
      leaf.dtype)


def tokenizer_files(tmp_path_factory, name: str) -> dict[str, str]:
  """{tokenizer_workdir, data_dir}: a random tiny tokenizer and the
  shapes_small data it was set up on, in a new temporary folder."""
  root = tmp_path_factory.mktemp(name)
  data_dir = str(root / "tfds")
  return dict(tokenizer_workdir=make_tokenizer_workdir(str(root / "tok"),
                                                       data_dir),
              data_dir=data_dir)


def make_tokenizer_workdir(workdir: str, data_dir: str, step: int = 1,
                           teacher_workdir: str = "", **model) -> str:
  """A tokenizer workdir holding a randomly initialised tiny ViT-VQGAN
  (model: config.model fields to change; teacher_workdir: the frozen grid
  tokenizer of a model with teacher_codes > 0).

  Saved through the trainer's own checkpointer (the layout load_tokenizer
  reads). The state is filled from its abstract shapes with random numpy
  values: compiling the real init (or a train step) takes 15 s to minutes
  of CPU, which these tests do not need.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from unimm import parallel  # pylint: disable=g-import-not-at-top
  from unimm.train import tasks  # pylint: disable=g-import-not-at-top
  from unimm.train import trainer  # pylint: disable=g-import-not-at-top
  config = tiny_tokenizer_config(data_dir)
  config.model.update(model)
  config.teacher_workdir = teacher_workdir
  task = tasks.get_task(config)
  iterator = iter(task.train_data(0, 1))
  batch = trainer.device_batch(next(iterator))
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                          batch)
  mesh = parallel.make_mesh(dict(data=1), jax.devices()[:1])
  program = trainer.build_program(config, task, abstract, mesh=mesh)
  rng = np.random.default_rng(0)
  state = jax.tree_util.tree_map_with_path(
      lambda p, x: _random_leaf(p, x, rng), program.abstract_state)
  state = jax.device_put(state, program.state_shardings)
  state = state.replace(step=jax.numpy.asarray(step, jax.numpy.int32))
  checkpointer = trainer._Checkpointer(  # pylint: disable=protected-access
      workdir, config, trainer._batch_spec(abstract))  # pylint: disable=protected-access
  checkpointer.save(step, state, iterator)
  checkpointer.close()
  return workdir


def make_text_tokenizer(prefix: str) -> str:
  _, captions, _ = shapes.generate(300, 0)
  return text_lib.train_sentencepiece(captions, 64, prefix)


@pytest.fixture(scope="module")
def pretokenized(tmp_path_factory):
  root = tmp_path_factory.mktemp("pretok")
  data_dir = str(root / "tfds")
  workdir = make_tokenizer_workdir(str(root / "tokenizer"), data_dir)
  spiece = make_text_tokenizer(str(root / "spiece"))
  out = str(root / "out")
  # 3 examples per shard: 40 examples -> 14 shards, the last one partial;
  # batch_size 16 -> a padded final encoder batch.
  tokenizer = api.load_tokenizer(workdir)
  metadata = pretokenize.pretokenize(
      tokenizer, spiece, "shapes_small", "train", out, TEXT_LENGTH,
      num_examples=NUM_EXAMPLES, batch_size=16, data_dir=data_dir,
      records_per_shard=3, tokenizer_workdir=workdir)
  return dict(out=out, metadata=metadata, workdir=workdir, spiece=spiece,
              data_dir=data_dir, tokenizer=tokenizer)


def _records(out):
  source = pretokenize.pretokenized_source(out)
  return [pretokenize.parse_example(source[i]) for i in range(len(source))]


def test_metadata_and_records_round_trip(pretokenized):
  out, metadata = pretokenized["out"], pretokenized["metadata"]
  assert metadata == json.load(open(os.path.join(out, "train.json")))
  assert metadata["num_examples"] == NUM_EXAMPLES
  assert metadata["grid"] == [4, 4] and metadata["image_length"] == 16
  assert metadata["num_codes"] == 16 and metadata["text_length"] == 8
  assert metadata["text_vocab_size"] == 64 and metadata["tokenizer_step"] == 1
  assert len(metadata["shards"]) == 14
  assert sorted(n for n in os.listdir(out) if n.endswith(".array_record")) \
      == metadata["shards"]
  assert not any(n.startswith(".tmp") for n in os.listdir(out))
  records = _records(out)
  assert len(records) == NUM_EXAMPLES
  ids = np.stack([r["image_ids"] for r in records])  # [N, 16]
  assert ids.dtype == np.int32 and ids.shape == (NUM_EXAMPLES, 16)
  assert ids.min() >= 0 and ids.max() < 16
  text_ids = np.stack([r["text_ids"] for r in records])
  assert text_ids.shape == (NUM_EXAMPLES, TEXT_LENGTH)
  assert text_ids.min() >= 0 and text_ids.max() < 64
  # Records follow the data set order and hold its captions ...
  data = next(iter(pipeline.image_text_dataset(
      "shapes_small", "train", batch_size=NUM_EXAMPLES, image_size=32,
      shuffle=False, seed=0, num_epochs=1,
      data_dir=pretokenized["data_dir"])))
  assert [r["caption"] for r in records] == list(data["caption"])
  # ... their images' ids under the frozen tokenizer ...
  from unimm import api  # pylint: disable=g-import-not-at-top
  tokenizer = api.load_tokenizer(pretokenized["workdir"])
  np.testing.assert_array_equal(
      tokenizer.encode(data["image"]).reshape(NUM_EXAMPLES, -1), ids)
  # ... and their text ids (EOS-terminated; long captions truncated).
  spiece = text_lib.TextTokenizer.load(
      os.path.join(out, pretokenize.TEXT_TOKENIZER_FILE))
  expected = spiece.encode(list(data["caption"]), TEXT_LENGTH)
  np.testing.assert_array_equal(text_ids, expected.ids)
  assert metadata["num_truncated_captions"] == expected.num_truncated > 0
  assert (text_ids == spiece.eos_id).sum(axis=1).tolist() == [1] * len(ids)


def test_reader_batches_shuffle_and_epochs(pretokenized):
  out = pretokenized["out"]
  dataset = pretokenize.pretokenized_dataset(
      out, batch_size=8, shuffle=True, seed=3, num_epochs=2)
  batches = list(dataset)
  assert len(batches) == 2 * NUM_EXAMPLES // 8
  assert set(batches[0]) == {"text_ids", "image_ids"}
  assert batches[0]["text_ids"].shape == (8, TEXT_LENGTH)
  assert batches[0]["image_ids"].shape == (8, 16)
  assert batches[0]["image_ids"].dtype == np.int32
  records = _records(out)
  key = lambda ids: ids.tobytes()  # noqa: E731
  all_ids = sorted(key(r["image_ids"]) for r in records)
  epoch = [key(row) for b in batches[:5] for row in b["image_ids"]]
  assert sorted(epoch) == all_ids  # one epoch = every record once
  in_order = [key(r["image_ids"]) for r in records]
  assert epoch != in_order  # shuffled


def _row_keys(records):
  return [r["image_ids"].tobytes() + r["text_ids"].tobytes() for r in records]


def test_per_host_shards_are_disjoint(pretokenized):
  seen = []
  for index in range(3):
    dataset = pretokenize.pretokenized_dataset(
        pretokenized["out"], batch_size=13, shuffle=True, seed=0,
        num_epochs=1, process_index=index, process_count=3)
    (batch,) = list(dataset)  # 40 // 3 = 13 records per host
    seen.append(collections.Counter(_row_keys([
        {"image_ids": i, "text_ids": t}
        for i, t in zip(batch["image_ids"], batch["text_ids"])])))
  # Untrained ids and truncated captions repeat, so compare multisets:
  # together the hosts read 39 records, none more often than it exists.
  hosts = sum(seen, collections.Counter())
  assert sum(hosts.values()) == 39
  assert not hosts - collections.Counter(_row_keys(_records(
      pretokenized["out"])))


def test_iterator_state_resumes_exactly(pretokenized):
  make = lambda: iter(pretokenize.pretokenized_dataset(  # noqa: E731
      pretokenized["out"], batch_size=4, shuffle=True, seed=1))
  iterator = make()
  for _ in range(3):
    next(iterator)
  state = iterator.get_state()
  expected = [next(iterator) for _ in range(12)]  # crosses an epoch
  resumed = make()
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image_ids"], want["image_ids"])
    np.testing.assert_array_equal(got["text_ids"], want["text_ids"])


def test_errors_name_the_fix(pretokenized, tmp_path):
  with pytest.raises(ValueError, match="pretokenize --split validation"):
    pretokenize.pretokenized_dataset(pretokenized["out"], batch_size=4,
                                     shuffle=False, seed=0,
                                     split="validation")
  with pytest.raises(ValueError, match="--image_size 32"):
    pretokenize.pretokenize(pretokenized["tokenizer"], pretokenized["spiece"],
                            "shapes_small", "train", str(tmp_path), 8,
                            image_size=64)


def test_cli_writes_the_same_records(pretokenized, tmp_path):
  out = str(tmp_path / "cli")
  flag_values = flags.FlagValues()
  pretokenize_tool.define_flags(flag_values)
  flag_values([
      "pretokenize", f"--tokenizer_workdir={pretokenized['workdir']}",
      f"--text_tokenizer={pretokenized['spiece']}", "--source=shapes_small",
      "--split=train", f"--out={out}", f"--text_length={TEXT_LENGTH}",
      "--num_examples=12", "--batch_size=8",
      f"--data_dir={pretokenized['data_dir']}"])
  metadata = pretokenize_tool.main(["pretokenize"], flag_values)
  assert metadata["tokenizer_workdir"] == os.path.abspath(
      pretokenized["workdir"])
  got = _records(out)
  want = _records(pretokenized["out"])[:12]
  assert len(got) == 12
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
    np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    assert a["caption"] == b["caption"]


# ----------------------------------------------------------------------------
# Several captions per image.
# ----------------------------------------------------------------------------

# Per image: its captions (3 is the cap below, so the 4th is not encoded).
# Short captions: the tiny text tokenizer keeps them distinct in TEXT_LENGTH.
SEVERAL_CAPTIONS = [
    ["red", "big red", "red top"],
    ["blue", "blue box"],
    ["green"],
    ["white", "two white", "white x", "white y"],
    ["orange", "big orange"],
    ["cyan"],
]
MAX_CAPTIONS = 3


@pytest.fixture(scope="module")
def several(pretokenized, tmp_path_factory):
  """A converted set with 1-4 captions per image, pre-tokenized with at
  most MAX_CAPTIONS captions per record."""
  root = tmp_path_factory.mktemp("several")
  rows = []
  for i, captions in enumerate(SEVERAL_CAPTIONS):
    noise = np.random.default_rng(i).integers(0, 256, (32, 32, 3), np.uint8)
    Image.fromarray(noise).save(root / f"{i}.png")
    rows.append({"image": f"{i}.png", "caption": captions})
  (root / "captions.jsonl").write_text(
      "\n".join(json.dumps(row) for row in rows))
  data = str(root / "converted")
  convert.convert(out=data, image_size=32, images_dir=str(root),
                  captions=str(root / "captions.jsonl"), image_format="png")
  out = str(root / "out")
  metadata = pretokenize.pretokenize(
      pretokenized["tokenizer"], pretokenized["spiece"], data, "train", out,
      TEXT_LENGTH, batch_size=16, records_per_shard=4,
      max_captions=MAX_CAPTIONS)
  return dict(out=out, metadata=metadata, records=_records(out))


def _record_of_text(records):
  """text ids bytes -> index of the (only) record holding that caption."""
  owner = {}
  for index, record in enumerate(records):
    for row in record["text_ids_all"]:
      assert row.tobytes() not in owner  # the captions encode distinctly
      owner[row.tobytes()] = index
  return owner


def test_every_caption_of_a_record_is_encoded(several, pretokenized):
  metadata, records = several["metadata"], several["records"]
  kept = [c[:MAX_CAPTIONS] for c in SEVERAL_CAPTIONS]
  assert metadata["num_examples"] == len(SEVERAL_CAPTIONS)
  assert metadata["num_captions"] == sum(len(c) for c in kept) == 12
  assert metadata["max_captions_per_record"] == MAX_CAPTIONS
  assert metadata["caption_limit"] == MAX_CAPTIONS
  assert metadata["num_dropped_captions"] == 1
  spiece = text_lib.TextTokenizer.load(pretokenized["spiece"])
  by_caption = {r["caption"]: r for r in records}
  assert sorted(by_caption) == sorted(c[0] for c in SEVERAL_CAPTIONS)
  for captions in kept:
    record = by_caption[captions[0]]
    assert record["captions"] == captions
    encoded = spiece.encode(captions, TEXT_LENGTH)
    np.testing.assert_array_equal(record["text_ids_all"], encoded.ids)
    np.testing.assert_array_equal(record["text_ids"], encoded.ids[0])
    assert record["text_ids_all"].dtype == np.int32
  # Truncation is counted over the first captions and over all encoded.
  assert metadata["num_truncated_captions"] == spiece.encode(
      [c[0] for c in kept], TEXT_LENGTH).num_truncated
  assert metadata["num_truncated_all_captions"] == spiece.encode(
      sum(kept, []), TEXT_LENGTH).num_truncated > 0
  # A record with one caption stores no text_ids_all and reads as one.
  source = pretokenize.pretokenized_source(several["out"])
  raw = [serialization.msgpack_restore(source[i]) for i in range(len(source))]
  assert sorted(len(r.get("text_ids_all", [0])) for r in raw) == [
      1, 1, 2, 2, 3, 3]
  assert by_caption["green"]["text_ids_all"].shape == (1, TEXT_LENGTH)
  # Distinct images (so the draw tests can tell records apart by them).
  assert len({r["image_ids"].tobytes() for r in records}) == len(records)


def test_records_without_all_captions_read_as_one(pretokenized):
  text_ids = np.arange(TEXT_LENGTH, dtype=np.int32)
  older = serialization.msgpack_serialize({  # as written before text_ids_all
      "image_ids": np.zeros(16, np.int32), "text_ids": text_ids,
      "caption": "a red star"})
  example = pretokenize.parse_example(older)
  np.testing.assert_array_equal(example["text_ids_all"], text_ids[None])
  assert example["captions"] == ["a red star"]
  # A one-caption split (shapes) draws its only caption: the same batches.
  read = lambda draw: list(pretokenize.pretokenized_dataset(  # noqa: E731
      pretokenized["out"], batch_size=8, shuffle=True, seed=2, num_epochs=2,
      draw_caption=draw))
  assert pretokenized["metadata"]["max_captions_per_record"] == 1
  for drawn, first in zip(read(True), read(False)):
    np.testing.assert_array_equal(drawn["text_ids"], first["text_ids"])
    np.testing.assert_array_equal(drawn["image_ids"], first["image_ids"])


def _drawn(out, seed, num_batches, batch_size=3, iterator=None, **kwargs):
  iterator = iterator or iter(pretokenize.pretokenized_dataset(
      out, batch_size=batch_size, shuffle=True, seed=seed,
      draw_caption=True, **kwargs))
  return [next(iterator) for _ in range(num_batches)], iterator


def test_training_draws_one_caption_per_example_and_epoch(several):
  records, num_epochs = several["records"], 6
  owner = _record_of_text(records)
  # 6 records, 3 per batch: 2 batches an epoch.
  batches, _ = _drawn(several["out"], 5, 2 * num_epochs)
  assert set(batches[0]) == {"text_ids", "image_ids"}
  assert batches[0]["text_ids"].shape == (3, TEXT_LENGTH)
  drawn = collections.defaultdict(list)  # record -> caption row per epoch
  for b, batch in enumerate(batches):
    for text_ids, image_ids in zip(batch["text_ids"], batch["image_ids"]):
      record = owner[text_ids.tobytes()]
      # Never another record's caption: it comes with its own image.
      np.testing.assert_array_equal(records[record]["image_ids"], image_ids)
      rows = [r.tobytes() for r in records[record]["text_ids_all"]]
      drawn[record].append(rows.index(text_ids.tobytes()))
      assert len(drawn[record]) == b // 2 + 1  # once per epoch
  assert sorted(len(records[r]["text_ids_all"]) for r in drawn) == [
      1, 1, 2, 2, 3, 3]
  rotations = []
  for record, picks in drawn.items():
    k = len(records[record]["text_ids_all"])
    # Every caption once every k epochs (one caption: always it).
    for start in range(0, num_epochs, k):
      assert sorted(picks[start:start + k]) == list(range(k)), picks
    rotations.append(picks == [e % k for e in range(num_epochs)])
  assert not all(rotations)  # the order is drawn, not a fixed rotation
  # Same seed, same draws; another seed, other draws.
  again, _ = _drawn(several["out"], 5, 2 * num_epochs)
  other, _ = _drawn(several["out"], 6, 2 * num_epochs)
  text = lambda bs: np.stack([b["text_ids"] for b in bs])  # noqa: E731
  np.testing.assert_array_equal(text(again), text(batches))
  assert not np.array_equal(text(other), text(batches))


def test_parti_trains_on_drawn_captions(several):
  sys.path.insert(0, os.path.abspath(CONFIGS))
  import parti_shapes  # pylint: disable=g-import-not-at-top
  from unimm.train import parti_task  # pylint: disable=g-import-not-at-top
  config = parti_shapes.get_config(
      f"size=tiny,steps=4,batch=3,text_vocab=64,codes=16,grid=4,"
      f"text_length={TEXT_LENGTH}")
  config.data.pretokenized_dir = several["out"]
  task = parti_task.ParTask(config)
  got = list(itertools.islice(task.train_data(0, 1), 8))
  want, _ = _drawn(several["out"], config.seed, 8)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
  firsts = {r["text_ids"].tobytes() for r in several["records"]}
  assert any(t.tobytes() not in firsts for b in got for t in b["text_ids"])


def test_drawn_captions_resume_exactly(several):
  _, iterator = _drawn(several["out"], 1, 5, batch_size=2)
  state = iterator.get_state()
  want, _ = _drawn(several["out"], 1, 9, batch_size=2, iterator=iterator)
  _, resumed = _drawn(several["out"], 1, 0, batch_size=2)
  resumed.set_state(json.loads(json.dumps(state)))  # as grain saves it
  got, _ = _drawn(several["out"], 1, 9, batch_size=2, iterator=resumed)
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a["text_ids"], b["text_ids"])
    np.testing.assert_array_equal(a["image_ids"], b["image_ids"])
  with pytest.raises(ValueError, match="one caption per record.*new workdir"):
    resumed.set_state(state["parent"])  # a one-caption reader's state


def test_evaluation_reads_the_first_caption(several):
  records = several["records"]
  owner = _record_of_text(records)
  for process_index in range(2):
    (batch,) = pretokenize.pretokenized_dataset(
        several["out"], batch_size=3, shuffle=False, seed=0, num_epochs=1,
        process_index=process_index, process_count=2)
    for text_ids, image_ids in zip(batch["text_ids"], batch["image_ids"]):
      record = records[owner[text_ids.tobytes()]]
      np.testing.assert_array_equal(text_ids, record["text_ids"])
      np.testing.assert_array_equal(image_ids, record["image_ids"])


def test_caption_index_is_a_balanced_pure_draw():
  epochs = np.arange(12)
  for k in (1, 2, 3, 5):
    picks = pretokenize.caption_index(7, epochs, 4, k)
    np.testing.assert_array_equal(
        picks, pretokenize.caption_index(7, epochs, 4, k))
    for start in range(0, 10 - k, k):
      assert sorted(picks[start:start + k]) == list(range(k))
  # Each of K captions comes first about equally often over records.
  first = pretokenize.caption_index(0, 0, np.arange(3000), 3)
  assert np.bincount(first, minlength=3).min() > 900
  with pytest.raises(ValueError, match="num_captions >= 1"):
    pretokenize.caption_index(0, 0, 0, 0)
  with pytest.raises(ValueError, match="max_captions"):
    pretokenize.pretokenize(None, "unused.model", "shapes_small", "train",
                            "unused", TEXT_LENGTH, max_captions=0)
