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
  data_dir = str(tmp_path / "data")
  _seed_untrained_probe(data_dir)
  nb = _run("tokenizer.ipynb", tmp_path,
            UNIMM_TOKENIZER_WORKDIR=str(tmp_path / "tok"),
            UNIMM_COLAB_STEPS="3", UNIMM_COLAB_SOURCE="shapes_small",
            UNIMM_DATA_DIR=data_dir)
  text = _text(nb)
  assert "PSNR:" in text and "codes used on 64 images" in text
  assert "probe on reconstructions: single" in text
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(images) >= 2  # the data grid and the reconstructions


def _seed_untrained_probe(data_dir):
  """Saves a random-weight shapes probe where probe.get_probe looks for it
  ($UNIMM_DATA_DIR/probe/v{PROBE_VERSION}_32px), so the notebook's kernel
  loads it instead of training the real one for minutes (as
  tests/train/test_parti_task.py's use_pixel_probe does in-process)."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from unimm.evaluation import probe as probe_lib  # pylint: disable=g-import-not-at-top
  net = probe_lib.ProbeNet(image_size=32, width=4, cell_feature_dim=8)
  # Shapes only (eval_shape compiles nothing): this process needs no probe.
  shapes = jax.eval_shape(net.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32))
  rng = np.random.default_rng(0)
  params = jax.tree.map(
      lambda s: rng.normal(0, 0.1, s.shape).astype(s.dtype),
      shapes["params"])
  probe_lib.Probe(net, params).save(os.path.join(
      data_dir, "probe", f"v{probe_lib.PROBE_VERSION}_32px"))


def test_text_to_image_colab(tmp_path):
  import json  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "data")
  _seed_untrained_probe(data_dir)
  workdir = tmp_path / "t2i"
  nb = _run("text_to_image.ipynb", tmp_path,
            UNIMM_TEXT_TO_IMAGE_WORKDIR=str(workdir),
            UNIMM_COLAB_STEPS="2", UNIMM_COLAB_SOURCE="shapes_small",
            UNIMM_DATA_DIR=data_dir,
            # One CPU device, as on a Colab CPU runtime (8 simulated devices
            # cost ~30 s more in compiles and checkpoint copies).
            XLA_FLAGS="--xla_force_host_platform_device_count=1")
  text = _text(nb)
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
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  # The packaged model's grid, two recipe grids, three settings, the tokens.
  assert len(images) == 7


def test_interleaved_colab(tmp_path):
  """Trains every stage for a few steps on a handful of documents, then
  captions, samples (with and without guidance) and edits."""
  import json  # pylint: disable=g-import-not-at-top
  data_dir = str(tmp_path / "data")
  _seed_untrained_probe(data_dir)
  workdir = tmp_path / "interleaved"
  nb = _run("interleaved.ipynb", tmp_path,
            UNIMM_INTERLEAVED_WORKDIR=str(workdir),
            UNIMM_COLAB_STEPS="2", UNIMM_COLAB_SOURCE="shapes_small",
            UNIMM_DATA_DIR=data_dir,
            XLA_FLAGS="--xla_force_host_platform_device_count=1")
  text = _text(nb)
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
  images = [out for cell in nb.cells if cell.cell_type == "code"
            for out in cell.outputs if "image/png" in out.get("data", {})]
  assert len(images) == 5  # documents.png, captions, two samples, the story
