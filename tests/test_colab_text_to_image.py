"""The text-to-image Colab runs top to bottom on a CPU (briefly)."""

import json

from PIL import Image

import colab_helpers


def test_text_to_image_colab(tmp_path):
  workdir = tmp_path / "t2i"
  nb = colab_helpers.run_quick(
      "text_to_image.ipynb", tmp_path, steps=2, one_device=True,
      UNIMM_TEXT_TO_IMAGE_WORKDIR=str(workdir))
  text = colab_helpers.text(nb)
  # First the packaged model draws 4 prompts.
  assert "shapes-parti, step 1600" in text and "uint8 (4, 32, 32, 3)" in text
  with open(workdir / "parti" / "eval" / "report.json") as f:
    report = json.load(f)
  assert 0.0 <= report["prompt_accuracy_single"] <= 1.0
  assert report["steps"] == 2 and report["num_prompts"] == 16
  assert f"prompt_accuracy_single: {report['prompt_accuracy_single']:.3f}" in text
  with Image.open(workdir / "parti" / "samples" / "grid.png") as grid:
    assert grid.width > 8 * 128  # 8 prompts of 128 px cells side by side
  # Three settings sampled 3 prompts each, as uint8 32x32 RGB images.
  assert text.count("uint8 (3, 32, 32, 3)") == 3
  assert "ids int32 (2, 8, 8) in [0, 512)" in text
  images = colab_helpers.images(nb)
  # The packaged model's grid, two recipe grids, three settings, the tokens.
  assert len(images) == 7
