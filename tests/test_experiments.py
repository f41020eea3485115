"""The apps' sample and caption modes on (random, tiny) exported models."""
import json
import os
import sys

import numpy as np
from PIL import Image
import pytest

import unimm
from unimm import experiments

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "inference"))
import random_models  # noqa: E402  pylint: disable=g-import-not-at-top


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  return random_models.write_random_models(str(tmp_path_factory.mktemp("m")))


def test_caption_mode_reads_files_and_writes_captions(models, tmp_path):
  rng = np.random.default_rng(0)
  pixels = rng.integers(0, 256, (2, 48, 40, 3), np.uint8)  # resized to 32
  files = []
  for i, image in enumerate(pixels):
    files.append(str(tmp_path / f"{i}.png"))
    Image.fromarray(image).save(files[-1])
  out = str(tmp_path / "out")
  captions = experiments.caption(models["interleaved"], images=files,
                                 output_dir=out)
  model = unimm.load_model(models["interleaved"])
  assert captions == model.caption(experiments.read_images(files, 32))
  with open(os.path.join(out, "captions.jsonl")) as f:
    rows = [json.loads(line) for line in f]
  assert rows == [{"image": p, "caption": c} for p, c in zip(files, captions)]
  assert os.path.exists(os.path.join(out, "grid.png"))
  with pytest.raises(ValueError, match="needs an interleaved model"):
    experiments.caption(models["parti"], images=files)


def test_sample_mode_takes_the_eval_settings_and_a_new_folder(models):
  first = experiments.sample(models["parti"], prompts=["a red circle"])
  second = experiments.sample(models["parti"], prompts=["a red circle"])
  assert os.path.dirname(first[0]) != os.path.dirname(second[0])
  np.testing.assert_array_equal(np.asarray(Image.open(first[0])),
                                np.asarray(Image.open(second[0])))
  expected = unimm.load_model(models["parti"]).sample(["a red circle"])
  np.testing.assert_array_equal(np.asarray(Image.open(first[0])),
                                expected[0])
  with pytest.raises(ValueError, match="no upsampler"):
    experiments.sample(models["interleaved"], prompts=["a"], upscale=4)
