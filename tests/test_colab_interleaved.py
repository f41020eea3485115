"""The interleaved Colab runs top to bottom on a CPU (briefly)."""

import json

import colab_helpers


def test_interleaved_colab(tmp_path):
  """The packaged model captions, draws and edits; then the recipe trains
  every stage for a few steps on a handful of documents and the trained
  model does the same."""
  workdir = tmp_path / "interleaved"
  nb = colab_helpers.run_quick(
      "interleaved.ipynb", tmp_path, steps=2, one_device=True,
      UNIMM_INTERLEAVED_WORKDIR=str(workdir))
  text = colab_helpers.text(nb)
  assert "shapes-interleaved, step " in text
  with open(workdir / "interleaved" / "eval" / "report.json") as f:
    report = json.load(f)
  assert report["steps"] == 2
  for key in ("caption_accuracy", "prompt_accuracy_single", "edit_accuracy"):
    assert f"{key}: {report[key]:.3f}" in text
  assert text.count("true: ") == 8  # four captions by each model
  assert text.count("samples: uint8 (4, 32, 32, 3)") == 2
  for tag in ("packaged", "trained"):
    for name in ("captions.png", "samples.png", "edit_story.png"):
      assert (workdir / f"{tag}_{name}").exists(), (tag, name)
  assert (workdir / "interleaved" / "samples" / "grid.png").exists()
  images = colab_helpers.images(nb)
  # Three grids per model, the eval's documents and the recipe's samples.
  assert len(images) == 8
