"""Metric writers: TensorBoard + console (clu) and a JSONL file.

`create_writer(workdir)` is what the trainer uses: process 0 writes
TensorBoard summaries under workdir/tensorboard, logs scalars to the console
and appends one JSON object per write to workdir/metrics.jsonl; other
processes only log. On another filesystem (gs://...), which cannot append,
the JSONL file is written whole at each write (it holds a few numbers per
logged step).
"""
import json
import math
import os
from typing import Any, Mapping

from clu import metric_writers
from etils import epath
import jax
import numpy as np

from unimm import paths

METRICS_FILE = "metrics.jsonl"


def _to_json_number(value: Any) -> float | int | None:
  """A Python number for JSON; NaN/inf become None (JSON has no NaN)."""
  value = np.asarray(value)
  if value.size != 1:
    raise ValueError(f"Expected a scalar metric, got shape {value.shape}.")
  value = value.item()
  if isinstance(value, bool):
    return int(value)
  if isinstance(value, float) and not math.isfinite(value):
    return None
  return value


class JsonlWriter(metric_writers.MetricWriter):
  """Appends {"step": step, name: value, ...} lines to a JSONL file.

  Scalars, texts and hyperparameters are recorded; images, videos, audio and
  histograms are left to the TensorBoard writer (JSONL is for numbers a
  script can read back). Non-finite scalars are written as null.
  """

  def __init__(self, path: str):
    self._path = path
    target = epath.Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    self._file, self._text = None, ""
    if paths.is_uri(path):
      self._text = target.read_text() if target.exists() else ""
    else:
      self._file = open(path, "a", encoding="utf-8")

  @property
  def path(self) -> str:
    return self._path

  def _write(self, record: Mapping[str, Any]) -> None:
    line = json.dumps(record, sort_keys=False) + "\n"
    if self._file is None:
      self._text += line
      epath.Path(self._path).write_text(self._text)
      return
    self._file.write(line)
    self._file.flush()

  def write_summaries(self, step, values, metadata=None):
    del metadata
    scalars = {k: v for k, v in values.items() if np.asarray(v).size == 1}
    if scalars:
      self.write_scalars(step, scalars)

  def write_scalars(self, step: int, scalars: Mapping[str, Any]):
    record = {"step": int(step)}
    record.update({k: _to_json_number(v) for k, v in scalars.items()})
    self._write(record)

  def write_texts(self, step: int, texts: Mapping[str, str]):
    record = {"step": int(step)}
    record.update({k: str(v) for k, v in texts.items()})
    self._write(record)

  def write_hparams(self, hparams: Mapping[str, Any]):
    self._write({"hparams": json.loads(json.dumps(hparams, default=str))})

  # Array-valued summaries are TensorBoard's job, not this file's.
  def write_images(self, step, images):
    del step, images

  def write_videos(self, step, videos):
    del step, videos

  def write_audios(self, step, audios, *, sample_rate):
    del step, audios, sample_rate

  def write_histograms(self, step, arrays, num_buckets=None):
    del step, arrays, num_buckets

  def flush(self):
    if self._file is not None:
      self._file.flush()

  def close(self):
    if self._file is not None and not self._file.closed:
      self._file.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl, in order."""
  text = epath.Path(workdir, METRICS_FILE).read_text(encoding="utf-8")
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def create_writer(workdir: str, *, process_index: int | None = None,
                  asynchronous: bool = True) -> metric_writers.MetricWriter:
  """Console + TensorBoard + JSONL on process 0; console only elsewhere."""
  process_index = jax.process_index() if process_index is None else (
      process_index)
  if process_index > 0:
    return metric_writers.create_default_writer(just_logging=True)
  default = metric_writers.create_default_writer(
      os.path.join(workdir, "tensorboard"), asynchronous=asynchronous)
  return metric_writers.MultiWriter(
      [default, JsonlWriter(os.path.join(workdir, METRICS_FILE))])
