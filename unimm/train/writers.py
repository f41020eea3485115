"""Metric writers: TensorBoard + console (clu) and a JSONL file.

`create_writer(workdir)` is what the trainer uses: process 0 writes
TensorBoard summaries under workdir/tensorboard, logs scalars to the console
and appends one JSON object per write to workdir/metrics.jsonl; other
processes only log.
"""
import json
import math
import os
from typing import Any, Mapping

from clu import metric_writers
import jax
import numpy as np

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
    dirname = os.path.dirname(path)
    if dirname:
      os.makedirs(dirname, exist_ok=True)
    self._file = open(path, "a", encoding="utf-8")

  @property
  def path(self) -> str:
    return self._path

  def _write(self, record: Mapping[str, Any]) -> None:
    self._file.write(json.dumps(record, sort_keys=False) + "\n")
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
    self._file.flush()

  def close(self):
    if not self._file.closed:
      self._file.close()


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """The records of workdir/metrics.jsonl, in order."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding="utf-8") as f:
    return [json.loads(line) for line in f if line.strip()]


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
