"""Pre-tokenization: shards hold the frozen tokenizer's ids and the captions'
text ids; the reader is sharded per host, shuffled and checkpointable."""
import collections
import json
import os
import sys

from absl import flags
import numpy as np
import pytest

from unimm import api
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


def make_tokenizer_workdir(workdir: str, data_dir: str, step: int = 1) -> str:
  """A tokenizer workdir holding a randomly initialised tiny ViT-VQGAN.

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
