"""The own-data recipe with model=interleaved (configs/own_data.py) at toy
size on scikit-learn's digits (tests/test_own_data.py makes the data set):
the decoder-only model on caption->image and image->caption documents."""
import json
import os

import numpy as np
from PIL import Image
import pytest

from unimm import end_to_end
from unimm.data import interleaved as il_data
from unimm.data import pipeline
from unimm.models import image_input as image_input_lib
from unimm.models import vocab as vocab_lib
from unimm.evaluation import generation_metrics

from test_own_data import digits  # noqa: F401  pylint: disable=unused-import
from test_own_data import NUM_TRAIN
from test_own_data import toy_config


def toy_interleaved_config(data: str, extra: str = ""):
  """configs/own_data.py:model=interleaved at seconds of CPU."""
  config = toy_config(data, ",model=interleaved,interleaved_steps=3,"
                      f"interleaved_batch=8,text_length=12{extra}")
  model = config.interleaved
  model.model.update(embed_dim=32, num_heads=4, head_dim=8, mlp_dim=64,
                     num_layers=2)
  model.log_every_steps = 1
  model.eval.update(batch_size=8, num_batches=2, retrieval_pairs=6,
                    num_grid_samples=4, caption_beams=1, caption_rerank=0.0)
  return config


def test_interleaved_recipe_trains_on_pairs_both_ways(digits, tmp_path,
                                                      monkeypatch):
  config = toy_interleaved_config(digits["both"])
  assert "parti" not in config
  workdir = str(tmp_path / "own_il")
  paths = end_to_end.Paths(workdir)
  # FID / CLIP score (their networks are tested in tests/evaluation): the
  # eval hands them the held-out captions and a sampler of this model.
  scored = []

  def fake_metrics(eval_config, sample_fn, *, workdir, image_size):
    prompts = generation_metrics.load_prompts(
        eval_config["metrics_prompts"], num_images=2, image_size=image_size)
    scored.append((prompts, sample_fn(prompts, 0).shape))
    return {"clip_score": 0.25}

  monkeypatch.setattr(generation_metrics, "check_eval_config",
                      lambda eval_config: True)
  monkeypatch.setattr(generation_metrics, "from_eval_config", fake_metrics)
  report = end_to_end.run(config, workdir)
  first = pipeline.read_captions(digits["both"], "validation",
                                 all_captions=False)
  # Held-out captions (SOURCE:SPLIT reads them in a fixed shuffled order).
  [(prompts, shape)] = scored
  assert len(prompts) == 2 and set(prompts) <= set(first)
  assert shape == (2, 32, 32, 3)
  assert report["clip_score"] == 0.25

  # Every pair became a caption->image and an image->caption document,
  # captions cut to text_length - 1 = 11 pieces.
  with open(os.path.join(paths.data, "train.json")) as f:
    train_meta = json.load(f)
  assert train_meta["num_examples"] == NUM_TRAIN
  assert train_meta["kind_counts"] == {"caption_image": NUM_TRAIN,
                                       "image_caption": NUM_TRAIN}
  assert train_meta["max_text_tokens"] == 11
  assert train_meta["num_unknown_text_tokens"] == 0  # the prompt is covered
  assert train_meta["source"] == os.path.abspath(digits["both"])

  # Held-out loss (text and image apart), retrieval both ways, the grids.
  assert report["steps"] == 3
  for key in ("eval_loss", "eval_text_loss", "eval_image_loss"):
    assert np.isfinite(report[key]), key
  assert report["retrieval_pairs"] == 6
  assert report["retrieval_chance_r1"] == pytest.approx(1 / 6)
  for key in ("retrieval_r1", "retrieval_r5", "retrieval_caption_r1",
              "retrieval_caption_r5"):
    assert 0.0 <= report[key] <= 1.0, key
  assert "prompt_accuracy_single" not in report  # no shapes probe
  eval_dir = os.path.join(paths.interleaved, "eval")
  assert Image.open(os.path.join(eval_dir, "heldout_samples.png")).size[0] > 0
  with open(os.path.join(eval_dir, "heldout_captions.tsv")) as f:
    rows = [line.rstrip("\n").split("\t") for line in f]
  assert rows[0] == ["caption", "generated"]
  assert [r[0] for r in rows[1:]] == first[:4]

  samples = os.path.join(paths.interleaved, "samples")
  with open(os.path.join(samples, "prompts.txt")) as f:
    assert f.read().splitlines() == first[:4]
  assert os.path.isfile(os.path.join(samples, "grid.png"))
  # A rerun skips every finished stage.
  assert end_to_end.run(config, workdir) == report


def test_resampler_reads_the_image_of_each_image_to_caption_pair(
    digits, tmp_path):
  # image_input=resampler: an image->caption document's image enters as 4
  # resampler queries over the frozen tokenizer's encoder; the rows carry
  # its pixel patches, a caption->image document's image stays codes.
  config = toy_interleaved_config(
      digits["both"], ",image_input=resampler,queries=4,patch=8")
  config.interleaved.eval.update(retrieval_pairs=4, num_grid_samples=2)
  workdir = str(tmp_path / "own_resampler")
  paths = end_to_end.Paths(workdir)
  report = end_to_end.run(config, workdir)

  metadata = il_data.load_metadata(paths.data, "train")
  setting = image_input_lib.ImageInput("resampler", 8, 4)
  assert il_data.image_input_of(metadata) == setting
  n = metadata["num_rows"]
  source = il_data.pretokenize.shard_source(paths.data, "train", metadata, n)
  batch = next(iter(il_data.packed_dataset(
      paths.data, "train", batch_size=n, shuffle=False, seed=0)))
  data_source, _ = pipeline.image_text_source(digits["both"], "train",
                                              image_size=32)
  images = np.stack([example["image"] for example in data_source])
  layout = vocab_lib.VocabLayout(**{
      k: metadata["layout"][k] for k in ("text_vocab_size",
                                         "image_vocab_size", "read_ids")})
  assert layout.read_ids
  documents = 0
  for r in range(n):
    ids = il_data.parse_row(source[r])["documents"]
    read = [int(i) // 2 for i in ids if i % 2]  # image->caption: 2 * i + 1
    expected = np.zeros((0, 8 * 8 * 3), np.uint8)
    if read:
      expected = np.concatenate(
          [image_input_lib.patchify(images[i], 8) for i in read])
    reads = batch["reads"][r]
    np.testing.assert_array_equal(reads[:len(expected)], expected)
    assert not reads[len(expected):].any()
    assert int(layout.is_read(batch["tokens"][r]).sum()) == 4 * len(read)
    # Caption->image documents keep their 16 codes.
    assert int(layout.is_image(batch["tokens"][r]).sum()) == 16 * (
        len(ids) - len(read))
    documents += len(ids)
  assert documents == 2 * NUM_TRAIN

  # The model trained on them reads held-out images: retrieval both ways.
  assert report["steps"] == 3 and np.isfinite(report["eval_loss"])
  assert report["retrieval_pairs"] == 4
  assert 0.0 <= report["retrieval_caption_r1"] <= 1.0
