"""The interleaved Colab runs top to bottom on a CPU (briefly)."""

import json

import colab_helpers


def test_interleaved_colab(tmp_path):
  """Trains every stage for a few steps on a handful of documents, then
  captions, samples (with and without guidance) and edits."""
  workdir = tmp_path / "interleaved"
  nb = colab_helpers.run_quick(
      "interleaved.ipynb", tmp_path, steps=2, one_device=True,
      UNIMM_INTERLEAVED_WORKDIR=str(workdir))
  text = colab_helpers.text(nb)
  with open(workdir / "interleaved" / "eval" / "report.json") as f:
    report = json.load(f)
  assert report["steps"] == 2
  for key in ("caption_accuracy", "prompt_accuracy_single", "edit_accuracy"):
    assert f"{key}: {report[key]:.3f}" in text
  assert "tokenizer held-out PSNR:" in text
  assert text.count("true: ") == 4  # four captions written
  assert "cfg_scale=None: uint8 (4, 32, 32, 3)" in text
  assert "cfg_scale=3.0: uint8 (4, 32, 32, 3)" in text
  for name in ("captions.png", "samples_cfgNone.png", "samples_cfg3.0.png",
               "edit_story.png"):
    assert (workdir / name).exists(), name
  images = colab_helpers.images(nb)
  assert len(images) == 5  # documents.png, captions, two samples, the story
