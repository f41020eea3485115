"""Data sets, workdirs, tokenizers and exports on a non-local filesystem.

The filesystem is "gs://" served from memory, with no network: etils.epath
sends gs:// paths to its fsspec backend (the `gpath._is_tf_installed`
switch off, so tf.io.gfile's real GCS client is never asked), and that
backend's fsspec filesystem is fsspec's in-memory one answering to the gs
protocol. Every file lives in a Python dict, so a stray `os.path.isfile`,
`open` or `os.makedirs` on one of these paths finds nothing or writes a
local "gs:" folder: the tests check both cannot hide.

Not covered, because their I/O does not go through epath and so cannot
reach this filesystem: ArrayRecord shards (array_record's C++ reader and
writer open paths themselves) and checkpoints (orbax writes arrays with
TensorStore). Those libraries have their own gs:// clients.
"""
import io
import json
import os
import socket
import subprocess
import sys
from unittest import mock

from etils import epath
from etils.epath import backend as epath_backend
from etils.epath import gpath
from fsspec.implementations.memory import MemoryFileSystem
import numpy as np
from PIL import Image
import pytest

from unimm import checkpoints
from unimm import export
from unimm.data import convert
from unimm.data import pipeline
from unimm.data import pretokenize
from unimm.evaluation import fid
from unimm.evaluation import grids
from unimm.evaluation import reports
from unimm.tokenizers import text as text_lib
from unimm.train import workdir_lock
from unimm.train import writers

ROOT = "gs://bucket"


class _MemoryGcs(MemoryFileSystem):
  """fsspec's in-memory filesystem under the gs:// scheme."""
  protocol = ("gs", "gcs")
  store = {}
  pseudo_dirs = [""]

  @classmethod
  def _strip_protocol(cls, path):
    path = os.fspath(path).removeprefix("gs://").removeprefix("gcs://")
    path = path.strip("/")
    return "/" + path if path else ""


class _MemoryGcsBackend(epath_backend._FileSystemSpecBackend):  # pylint: disable=protected-access
  """epath's fsspec backend, its filesystem the in-memory one."""

  def __init__(self, fs: MemoryFileSystem):
    self._memory = fs

  def fs(self, path):
    del path
    return self._memory


@pytest.fixture(name="gcs")
def fixture_gcs(tmp_path, monkeypatch):
  _MemoryGcs.store, _MemoryGcs.pseudo_dirs = {}, [""]
  fs = _MemoryGcs()
  table = dict(gpath._PREFIX_TO_BACKEND, gs=_MemoryGcsBackend(fs))  # pylint: disable=protected-access
  monkeypatch.chdir(tmp_path)
  with mock.patch.object(gpath, "_PREFIX_TO_BACKEND", table), \
      mock.patch.object(gpath, "_is_tf_installed", lambda: False):
    yield fs
  # A path handed to os.* would have made a local "gs:" folder here.
  assert not (tmp_path / "gs:").exists()


def test_the_filesystem_is_not_local(gcs):
  path = epath.Path(ROOT, "a", "b.txt")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("x")
  assert "/bucket/a/b.txt" in gcs.store
  assert not os.path.exists(str(path))


def test_report_is_written_atomically_and_read_back(gcs, monkeypatch):
  path = f"{ROOT}/w/eval/report.json"
  written = reports.write_report(path, {"loss": np.float32(0.5),
                                        "ids": np.arange(3)})
  assert json.loads(epath.Path(path).read_text()) == written == {
      "loss": 0.5, "ids": [0, 1, 2]}

  def broken_dump(*args, **kwargs):
    raise OSError("write failed")

  monkeypatch.setattr(reports.json, "dump", broken_dump)
  with pytest.raises(OSError, match="write failed"):
    reports.write_json(path, {"loss": 1.0})
  assert json.loads(epath.Path(path).read_text())["loss"] == 0.5
  # No temporary file left beside it.
  assert [p.name for p in epath.Path(path).parent.iterdir()] == [
      "report.json"]
  assert all("/bucket/w/eval/report.json" == k or not k.endswith(".tmp")
             for k in gcs.store)


def test_image_grid_png(gcs):
  del gcs
  images = np.zeros((3, 8, 8, 3), np.uint8)
  images[1] = 255
  path = f"{ROOT}/w/eval/samples.png"
  grids.save_image_grid(images, ["a", "b", "c"], path, columns=2, cell=16)
  with Image.open(io.BytesIO(epath.Path(path).read_bytes())) as image:
    assert image.format == "PNG"
    expected = grids.image_grid(images, ["a", "b", "c"], columns=2, cell=16)
    np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
  with pytest.raises(ValueError, match="image format"):
    grids.save_image(expected, f"{ROOT}/w/eval/samples")


def test_fid_statistics_cache(gcs):
  del gcs
  path = f"{ROOT}/w/eval/fid_reference_x.npz"
  mu, sigma = np.arange(3.0), np.eye(3) * 2.0
  fid.save_stats(path, mu, sigma)
  loaded = fid.load_stats(path)
  np.testing.assert_array_equal(loaded[0], mu)
  np.testing.assert_array_equal(loaded[1], sigma)


def test_text_tokenizer_trained_and_loaded(gcs):
  del gcs
  captions = [f"a {c} {s} on the left" for c in ("red", "blue", "green")
              for s in ("circle", "square", "triangle")] * 4
  path = text_lib.train_sentencepiece(captions, 40, f"{ROOT}/text/spiece")
  assert path == f"{ROOT}/text/spiece.model"
  tokenizer = text_lib.TextTokenizer.load(path)
  assert tokenizer.model_proto == epath.Path(path).read_bytes()
  assert tokenizer.decode(tokenizer.encode(["a red circle"], 16).ids) == [
      "a red circle"]
  with pytest.raises(ValueError, match="No SentencePiece model"):
    text_lib.TextTokenizer.load(f"{ROOT}/text/missing.model")
  # A run's config naming it resolves to it, as an absolute path does.
  assert checkpoints.resolve_path(path, f"{ROOT}/run", {},
                                  "text_tokenizer") == path


def test_pretokenized_metadata(gcs):
  del gcs
  out = f"{ROOT}/data"
  with pytest.raises(ValueError, match=r"found splits \[\]"):
    pretokenize.load_metadata(out, "train")
  metadata = {"format": pretokenize.FORMAT, "num_examples": 2,
              "shards": [pretokenize.shard_name("train", 0, 1)]}
  reports.write_json(pretokenize.metadata_path(out, "train"), metadata)
  assert pretokenize.load_metadata(out, "train") == metadata
  with pytest.raises(ValueError, match=r"split 'validation'.*\['train'\]"):
    pretokenize.load_metadata(out, "validation")
  with pytest.raises(ValueError, match="shards are missing"):
    pretokenize.shard_source(out, "train", metadata, 2)


def test_workdir_lock(gcs):
  del gcs
  workdir = f"{ROOT}/w"
  with workdir_lock.hold(workdir) as path:
    assert path == f"{workdir}/LOCK"
    held = json.loads(epath.Path(path).read_text())
    assert held["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match="already holds"):
      workdir_lock.acquire(workdir)
  assert not epath.Path(path).exists()
  # A lock of a process that no longer runs on this host is taken over.
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  epath.Path(path).write_text(json.dumps(
      {"host": socket.gethostname(), "pid": int(dead.stdout)}))
  assert workdir_lock.acquire(workdir) == path
  workdir_lock.release(path)
  # Another host's lock cannot be checked: the run fails naming it.
  epath.Path(path).write_text(json.dumps({"host": "elsewhere", "pid": 1}))
  with pytest.raises(RuntimeError, match="in use by another run"):
    workdir_lock.acquire(workdir)


def test_metrics_jsonl_appends(gcs):
  del gcs
  workdir = f"{ROOT}/w"
  writer = writers.JsonlWriter(f"{workdir}/{writers.METRICS_FILE}")
  writer.write_scalars(1, {"loss": np.float32(2.0)})
  writer.close()
  writer = writers.JsonlWriter(f"{workdir}/{writers.METRICS_FILE}")
  writer.write_scalars(2, {"loss": float("nan")})
  writer.close()
  assert writers.read_metrics(workdir) == [{"step": 1, "loss": 2.0},
                                           {"step": 2, "loss": None}]


def test_converted_data_set_info(gcs, tmp_path):
  del gcs
  Image.new("RGB", (12, 12), (255, 0, 0)).save(tmp_path / "red.png")
  (tmp_path / "captions.jsonl").write_text(
      json.dumps({"image": "red.png", "caption": "red"}) + "\n")
  local = tmp_path / "converted"
  convert.convert(out=str(local), image_size=8, images_dir=str(tmp_path),
                  captions=str(tmp_path / "captions.jsonl"),
                  image_format="png")
  source = f"{ROOT}/converted"
  for name in ("dataset_info.json", "features.json"):
    epath.Path(source, name).parent.mkdir(parents=True, exist_ok=True)
    epath.Path(source, name).write_bytes((local / name).read_bytes())
  assert pipeline.converted_info(source) == {
      "image_size": 8, "splits": {"train": 1},
      "features": ["caption", "captions", "image"]}
  with pytest.raises(ValueError, match=r"config.data.source='gs://bucket/x'"):
    pipeline.converted_info(f"{ROOT}/x")
  with pytest.raises(ValueError, match="--out='gs://bucket/new'.*local"):
    convert.convert(out=f"{ROOT}/new", image_size=8,
                    images_dir=str(tmp_path),
                    captions=str(tmp_path / "captions.jsonl"))
  assert not epath.Path(ROOT, "new").exists()


def test_export_checks_and_reads_the_remote_run(gcs):
  del gcs
  run = f"{ROOT}/run"
  reports.write_json(f"{run}/eval/report.json", {"fid": 3.0})
  assert export._eval_report(run) == {"fid": 3.0}  # pylint: disable=protected-access
  assert export._eval_report(f"{ROOT}/none") == {}  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="is the run being exported"):
    export._check_out(run, run)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="exists and is not empty"):
    export._check_out(run, f"{ROOT}/other")  # pylint: disable=protected-access
  export._check_out(f"{ROOT}/new", run)  # pylint: disable=protected-access
  assert not checkpoints.has_checkpoints(run)
  epath.Path(run, checkpoints.CHECKPOINT_DIR, "1").mkdir(parents=True)
  epath.Path(run, checkpoints.CHECKPOINT_DIR, "1", "x").write_text("")
  assert checkpoints.has_checkpoints(run)
  assert checkpoints.find(run) == run
