"""The tokenizer Colab runs top to bottom on a CPU (briefly; slow: run
with --run-slow)."""

import colab_helpers
import pytest


@pytest.mark.slow
def test_tokenizer_colab(tmp_path):
  nb = colab_helpers.run_quick(
      "tokenizer.ipynb", tmp_path, steps=3,
      UNIMM_TOKENIZER_WORKDIR=str(tmp_path / "tok"))
  text = colab_helpers.text(nb)
  assert "PSNR:" in text and "codes used on 64 images" in text
  assert "probe on reconstructions: single" in text
  images = colab_helpers.images(nb)
  assert len(images) >= 2  # the data grid and the reconstructions
