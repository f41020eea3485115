"""The tokenizer Colab runs top to bottom on a CPU (briefly)."""

import colab_helpers


def test_tokenizer_colab(tmp_path):
  data_dir = str(tmp_path / "data")
  colab_helpers.seed_untrained_probe(data_dir)
  nb = colab_helpers.run(
      "tokenizer.ipynb", tmp_path,
      UNIMM_TOKENIZER_WORKDIR=str(tmp_path / "tok"),
      UNIMM_COLAB_STEPS="3", UNIMM_COLAB_SOURCE="shapes_small",
      UNIMM_DATA_DIR=data_dir)
  text = colab_helpers.text(nb)
  assert "PSNR:" in text and "codes used on 64 images" in text
  assert "probe on reconstructions: single" in text
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 2  # the data grid and the reconstructions
