"""The Colab demos run top to bottom on a CPU (briefly)."""
import os

import nbformat
from nbclient import NotebookClient

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(name, tmp_path, **env):
  old = dict(os.environ)
  os.environ.update(env)
  try:
    with open(os.path.join(REPO, "colabs", name)) as f:
      nb = nbformat.read(f, as_version=4)
    NotebookClient(nb, timeout=600, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
  finally:
    os.environ.clear()
    os.environ.update(old)
  return nb


def _text(nb):
  return "\n".join(out.get("text", "") for cell in nb.cells
                   if cell.cell_type == "code" for out in cell.outputs)


def test_tokenizer_colab(tmp_path):
  nb = _run("tokenizer.ipynb", tmp_path,
            UNIMM_TOKENIZER_WORKDIR=str(tmp_path / "tok"),
            UNIMM_COLAB_STEPS="3", UNIMM_COLAB_SOURCE="shapes_small")
  text = _text(nb)
  assert "PSNR:" in text and "codes used on 64 images" in text
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 2  # the data grid and the reconstructions
