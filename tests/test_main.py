"""The entry point and the public API on a briefly trained tokenizer."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

import unimm
from unimm import config_lib
from unimm import experiments
from unimm.data import shapes

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "vit_vqgan_shapes.py")


@pytest.fixture(scope="module")
def tokenizer_workdir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("tokenizer"))
  config = config_lib.load_config(
      CONFIG + ":steps=3,batch=8", log_every_steps=1,
      **{"data.source": "shapes_small", "eval.num_images": 32,
         "eval.batch_size": 32, "eval.probe_prompts": 0})
  experiments.train_and_evaluate(config, workdir)
  return workdir


def test_training_writes_the_report_and_metrics(tokenizer_workdir):
  with open(os.path.join(tokenizer_workdir, "eval", "report.json")) as f:
    report = json.load(f)
  for key in ("psnr", "codebook_usage", "num_codes", "steps"):
    assert key in report
  assert report["steps"] == 3 and report["num_codes"] > 0
  assert 0 < report["codebook_usage"] <= 1 and report["psnr"] > 5
  assert os.path.exists(os.path.join(tokenizer_workdir, "eval",
                                     "reconstructions.png"))
  with open(os.path.join(tokenizer_workdir, "metrics.jsonl")) as f:
    lines = [json.loads(l) for l in f]
  assert any("loss" in l for l in lines)


def test_load_tokenizer_round_trip_and_errors(tokenizer_workdir):
  tok = unimm.load_tokenizer(tokenizer_workdir)
  images, _, _ = shapes.generate(3, seed=5)
  ids = tok.encode(images)
  assert ids.shape == (3, 8, 8) and ids.dtype == np.int32
  assert ((0 <= ids) & (ids < tok.num_codes)).all()
  recon = tok.decode(ids)
  assert recon.shape == images.shape and recon.dtype == np.uint8
  np.testing.assert_array_equal(tok.decode(ids), recon)  # deterministic
  with pytest.raises(ValueError, match="image_size"):
    tok.encode(images[:, :16])
  with pytest.raises(ValueError, match="uint8"):
    tok.encode(images.astype(np.float32))
  with pytest.raises(ValueError, match="num_codes"):
    tok.decode(ids + tok.num_codes)
  with pytest.raises(ValueError, match="no checkpoint"):
    unimm.load_tokenizer(os.path.join(tokenizer_workdir, "missing"))


def _main(*args):
  return subprocess.run(
      [sys.executable, "-m", "unimm.main", *args], cwd=REPO,
      capture_output=True, text=True, timeout=300, check=False)


def test_eval_mode_through_the_cli(tokenizer_workdir):
  os.remove(os.path.join(tokenizer_workdir, "eval", "report.json"))
  result = _main(f"--config={CONFIG}:steps=3,batch=8",
                 f"--workdir={tokenizer_workdir}", "--mode=eval",
                 "--config.data.source=shapes_small",
                 "--config.eval.num_images=32")
  assert result.returncode == 0, result.stderr[-3000:]
  with open(os.path.join(tokenizer_workdir, "eval", "report.json")) as f:
    assert json.load(f)["steps"] == 3


def test_bad_config_fails_before_compiling(tmp_path):
  result = _main(f"--config={CONFIG}", f"--workdir={tmp_path / 'w'}",
                 "--config.eval.num_image=1")
  assert result.returncode == 1
  # One line, no traceback: the field missing, a close match, the file.
  assert "Traceback" not in result.stderr
  line, = [l for l in result.stderr.splitlines() if "FATAL" in l]
  assert "--config.eval.num_image=1: config.eval has no field " in line
  assert "did you mean num_images?" in line and CONFIG in line
  assert not os.path.exists(tmp_path / "w")
  with pytest.raises(ValueError, match="patch_size"):
    config = config_lib.load_config(CONFIG, **{"model.patch_size": 5})
    experiments.train_and_evaluate(config, str(tmp_path))
  with pytest.raises(ValueError, match="config.mesh"):
    config = config_lib.load_config(CONFIG, **{"mesh.data": 3})
    experiments.train_and_evaluate(config, str(tmp_path))


def test_scan_argument_unrolls_the_cpu_sizes():
  # auto: unrolled at tiny / small (faster on XLA:CPU), scanned at the
  # larger sizes; true / false force it; anything else names the argument.
  for name in ("vit_vqgan_shapes", "parti_shapes", "interleaved_shapes"):
    path = os.path.join(REPO, "configs", f"{name}.py")
    assert not config_lib.load_config(path).model.scan_layers
    assert config_lib.load_config(path + ":scan=true").model.scan_layers
  big = os.path.join(REPO, "configs", "parti_shapes.py:size=350m")
  assert config_lib.load_config(big).model.scan_layers
  assert not config_lib.load_config(big + ",scan=false").model.scan_layers
  with pytest.raises(ValueError, match="scan='sometimes'"):
    config_lib.load_config(CONFIG + ":scan=sometimes")


def test_a_checkpoint_of_another_layout_is_named_not_dumped(
    tokenizer_workdir):
  # The fixture's layers are unrolled; resuming or evaluating its
  # checkpoint with them scanned fails early and names the cause.
  config = config_lib.load_config(
      CONFIG + ":steps=3,batch=8,scan=true",
      **{"data.source": "shapes_small", "eval.num_images": 32,
         "eval.batch_size": 32, "eval.probe_prompts": 0})
  for run in (experiments.train_and_evaluate, experiments.evaluate):
    with pytest.raises(ValueError, match=r"scan=true\|false") as error:
      run(config, tokenizer_workdir)
    message = str(error.value)
    assert "['layers']" in message and "['layers_0']" in message
    assert len(message) < 2000
