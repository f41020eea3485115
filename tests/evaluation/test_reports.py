"""unimm.evaluation.reports: numpy types become JSON, writes are atomic and
happen on process 0 only."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from unimm.evaluation import reports


def test_numpy_types_are_converted(tmp_path):
  path = tmp_path / "eval" / "report.json"  # the parent is created
  report = {"psnr": np.float32(25.5), "steps": np.int64(7),
            "ok": np.bool_(True), "usage": np.array([0.5, 1.0]),
            "grid": (4, 4), "nested": {"n": np.int32(3)},
            "device": jnp.asarray(2.0), "nan": float("nan"), "name": "x"}
  written = reports.write_report(str(path), report)
  loaded = json.loads(path.read_text())
  assert loaded.pop("nan") != loaded.get("nan")  # NaN survives as NaN
  assert loaded == {k: v for k, v in written.items() if k != "nan"}
  assert type(written["psnr"]) is float and written["psnr"] == 25.5
  assert type(written["steps"]) is int and type(written["ok"]) is bool
  assert written["usage"] == [0.5, 1.0] and written["grid"] == [4, 4]
  assert written["nested"] == {"n": 3} and written["device"] == 2.0
  assert np.isnan(written["nan"])
  with pytest.raises(TypeError, match="object"):
    reports.to_json({"bad": object()})


def test_a_failing_write_leaves_the_old_report(tmp_path, monkeypatch):
  path = str(tmp_path / "report.json")
  reports.write_report(path, {"psnr": 20.0})

  def broken_dump(value, f, **kwargs):
    f.write('{"psnr": ')  # half written, then fails
    raise OSError("disk full")

  monkeypatch.setattr(reports.json, "dump", broken_dump)
  with pytest.raises(OSError, match="disk full"):
    reports.write_report(path, {"psnr": 30.0})
  with open(path) as f:
    assert json.load(f) == {"psnr": 20.0}
  assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left


def test_only_process_zero_writes(tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda: 1)
  path = tmp_path / "report.json"
  assert reports.write_report(str(path), {"a": np.int8(1)}) == {"a": 1}
  assert not path.exists()
  reports.write_json(str(path), {"a": np.int8(1)})  # whatever the process
  assert json.loads(path.read_text()) == {"a": 1}
