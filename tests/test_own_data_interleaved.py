"""The own-data recipe with model=interleaved (configs/own_data.py) at toy
size on scikit-learn's digits (tests/test_own_data.py makes the data set):
the decoder-only model on caption->image and image->caption documents."""
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

from unimm import api
from unimm import end_to_end
from unimm.data import interleaved as il_data
from unimm.data import pipeline
from unimm.data import shapes
from unimm.models import image_input as image_input_lib
from unimm.models import vocab as vocab_lib
from unimm.tokenizers import text as text_lib
from unimm.evaluation import generation_metrics

from test_own_data import digits  # noqa: F401  pylint: disable=unused-import
from test_own_data import NUM_TRAIN
from test_own_data import toy_config
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "data"))
import test_pretokenize  # noqa: E402  pylint: disable=g-import-not-at-top


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


def _check_rows_read_the_image_to_caption_images(packed: str, data: str,
                                                setting, codes: int):
  """Each packed row's reads are exactly the pixel patches of its
  image->caption documents' images (document 2 * i + 1 reads pair i), in
  order, with the setting's READ (and NEWLINE) ids for each;
  caption->image documents keep their `codes` codes. Returns the documents
  counted."""
  metadata = il_data.load_metadata(packed, "train")
  assert il_data.image_input_of(metadata) == setting
  n = metadata["num_rows"]
  source = il_data.pretokenize.shard_source(packed, "train", metadata, n)
  batch = next(iter(il_data.packed_dataset(
      packed, "train", batch_size=n, shuffle=False, seed=0)))
  data_source, _ = pipeline.image_text_source(data, "train", image_size=32)
  images = np.stack([example["image"] for example in data_source])
  layout = vocab_lib.VocabLayout(**{
      k: metadata["layout"][k] for k in ("text_vocab_size",
                                         "image_vocab_size", "read_ids")})
  assert layout.read_ids
  p = setting.patch_size
  per_image = setting.span_length((32, 32, 3)) - 2  # READ (+ NEWLINE) ids
  documents = 0
  for r in range(n):
    ids = il_data.parse_row(source[r])["documents"]
    read = [int(i) // 2 for i in ids if i % 2]
    expected = np.zeros((0, p * p * 3), np.uint8)
    if read:
      expected = np.concatenate(
          [image_input_lib.patchify(images[i], p) for i in read])
    reads = batch["reads"][r]
    np.testing.assert_array_equal(reads[:len(expected)], expected)
    assert not reads[len(expected):].any()
    assert int(layout.is_read(batch["tokens"][r]).sum()) == (
        per_image * len(read))
    assert int(layout.is_image(batch["tokens"][r]).sum()) == codes * (
        len(ids) - len(read))
    documents += len(ids)
  return documents


@pytest.mark.parametrize("setting", [
    image_input_lib.ImageInput("patches", 8),
    image_input_lib.ImageInput("resampler", 8, 4)])
def test_pairs_are_packed_for_a_reading_setting(digits, tmp_path, setting):
  """write_pairs (the recipe's data stage; pack_interleaved --source DIR)
  reads the image opening each image->caption document by the setting."""
  tok = test_pretokenize.make_tokenizer_workdir(str(tmp_path / "tok"),
                                                str(tmp_path / "tfds"))
  spiece = test_pretokenize.make_text_tokenizer(str(tmp_path / "spiece"))
  packed = str(tmp_path / "packed")
  il_data.write_pairs(api.load_tokenizer(tok), spiece, packed, "train",
                      source=digits["both"], length=160, image_input=setting,
                      encode_batch_size=16)
  assert _check_rows_read_the_image_to_caption_images(
      packed, digits["both"], setting, 16) == 2 * NUM_TRAIN


def test_recipe_model_ids_follow_the_text_vocabulary(digits, tmp_path):
  """The model stage's read ids come from the vocabulary SentencePiece
  really made (fewer pieces than text_vocab move READ and NEWLINE)."""
  config = toy_interleaved_config(digits["both"], ",image_input=patches")
  workdir = str(tmp_path / "w")
  paths = end_to_end.Paths(workdir)
  os.makedirs(os.path.dirname(paths.text_model))
  _, captions, _ = shapes.generate(300, 0)
  spiece = text_lib.train_sentencepiece(captions, 40, paths.text_model[:-6])
  assert spiece == paths.text_model
  assert config.interleaved.vocab.text_vocab_size == 64  # asked for 64
  model = end_to_end.model_config(config, workdir).model
  layout = vocab_lib.VocabLayout(40, 16, read_ids=True)
  assert (model.vocab_size, model.read_id, model.newline_id,
          model.image_offset) == (layout.size, layout.read_id,
                                  layout.newline_id, layout.image_offset)


@pytest.mark.slow
def test_resampler_reads_the_image_of_each_image_to_caption_pair(
    digits, tmp_path):
  """The recipe with image_input=resampler through every stage: its rows
  (test_pairs_are_packed_for_a_reading_setting) train a model that
  evaluates retrieval both ways on held-out images."""
  config = toy_interleaved_config(
      digits["both"], ",image_input=resampler,queries=4,patch=8")
  config.interleaved.eval.update(retrieval_pairs=4, num_grid_samples=2)
  workdir = str(tmp_path / "own_resampler")
  paths = end_to_end.Paths(workdir)
  report = end_to_end.run(config, workdir)
  setting = image_input_lib.ImageInput("resampler", 8, 4)
  assert _check_rows_read_the_image_to_caption_images(
      paths.data, digits["both"], setting, 16) == 2 * NUM_TRAIN
  assert report["steps"] == 3 and np.isfinite(report["eval_loss"])
  assert report["retrieval_pairs"] == 4
  assert 0.0 <= report["retrieval_caption_r1"] <= 1.0
