"""unimm.progress.Progress: rate and ETA are right, lines are throttled."""
from absl import logging
import pytest

from unimm.progress import Progress
from unimm.progress import format_seconds


class Clock:

  def __init__(self):
    self.now = 100.0

  def __call__(self) -> float:
    return self.now


@pytest.fixture
def lines(monkeypatch):
  logged = []
  monkeypatch.setattr(logging, "info",
                      lambda fmt, *args: logged.append(fmt % args))
  return logged


def test_rate_and_eta(lines):
  clock = Clock()
  progress = Progress(1000, what="images", clock=clock)
  clock.now += 20
  progress.update(250)
  assert progress.rate == pytest.approx(12.5)
  assert progress.eta_seconds == pytest.approx(60.0)
  assert progress.fraction == pytest.approx(0.25)
  assert lines == ["images: 250/1000 (25.0%), 12.5/s, elapsed 0:00:20, "
                   "ETA 0:01:00."]


def test_lines_are_throttled_and_the_end_is_logged(lines):
  clock = Clock()
  progress = Progress(100, what="steps", every_seconds=10.0, clock=clock)
  for done in range(1, 100):
    clock.now += 0.5  # 49.5 s in all: a line every 10 s
    progress.update(done)
  assert len(lines) == 4
  assert lines[0].startswith("steps: 20/100 (20.0%)")
  clock.now += 0.5
  progress.update(100)  # the end, though only 0.5 s after the last line
  assert len(lines) == 5 and lines[-1].startswith("steps: 100/100 (100.0%)")
  assert lines[-1].endswith("ETA 0:00:00.")
  progress.update(100)
  progress.finish()
  assert len(lines) == 5  # each count once


def test_short_work_stays_silent(lines):
  clock = Clock()
  progress = Progress(10, clock=clock)
  for done in range(1, 11):
    clock.now += 0.1
    progress.update(done)
  assert not lines
  assert progress.elapsed_seconds == pytest.approx(1.0)
  clock = Clock()
  progress = Progress(10, clock=clock)
  clock.now += 30  # one slow batch: the end is logged
  progress.update(10)
  assert len(lines) == 1


def test_force_every_items_and_extra(lines):
  clock = Clock()
  progress = Progress(1000, what="probe steps", every_items=100, clock=clock)
  clock.now += 1
  assert not progress.update(50)
  assert progress.update(100)  # every_items
  assert progress.update(120, force=True, extra="loss 0.5000")
  assert lines[-1].endswith("; loss 0.5000.")


def test_unknown_total_and_fraction(lines):
  clock = Clock()
  progress = Progress(None, what="tar images", every_seconds=0, clock=clock)
  clock.now += 10
  progress.update(30)
  assert progress.eta_seconds == float("inf")
  assert lines[-1] == "tar images: 30, 3.0/s, elapsed 0:00:10."
  clock.now += 10
  progress.update(60, fraction=0.25)  # e.g. a quarter of the bytes read
  assert progress.eta_seconds == pytest.approx(60.0)
  assert lines[-1] == ("tar images: 60 (25.0%), 3.0/s, elapsed 0:00:20, "
                       "ETA 0:01:00.")
  progress.finish(80)
  assert lines[-1].startswith("tar images: 80 ")


def test_format_seconds():
  assert format_seconds(3725.4) == "1:02:05"
  assert format_seconds(float("inf")) == "?"
  assert format_seconds(float("nan")) == "?"
  with pytest.raises(ValueError, match="total=-1"):
    Progress(-1)
