"""Progress and ETA of long work, logged through absl at a bounded rate.

  progress = Progress(len(images), what="FID images")
  for done in ...:
    progress.update(done)   # absolute count done so far
  progress.finish()         # a closing line, if the work was long

logs lines such as

  FID images: 1200/5000 (24.0%), 153.2/s, elapsed 0:00:08, ETA 0:00:25.

at most every `every_seconds` (and every `every_items`, if set), and always
a line at done == total when an earlier line was logged or the work took
longer than `every_seconds` (short work stays silent). An unknown total
(None) logs the count and rate; `update(done, fraction=...)` then gives the
fraction done by another measure (e.g. bytes of the input read), for the
percentage and ETA.
"""
import time
from typing import Callable

from absl import logging


def format_seconds(seconds: float) -> str:
  """H:MM:SS, or "?" when unknown (inf / nan)."""
  if seconds != seconds or seconds in (float("inf"), float("-inf")):
    return "?"
  seconds = int(round(seconds))
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
  """Rate and ETA of `total` items of work, logged at most every
  `every_seconds` (module docstring).

  Attributes:
    total: items in all (None: unknown).
    what: the items' name, the start of each line ("FID images").
    start: the clock reading when the work started.
  """

  def __init__(self, total: int | None, what: str = "items",
               every_seconds: float = 10.0, *,
               every_items: int | None = None,
               clock: Callable[[], float] | None = None):
    if total is not None and total < 0:
      raise ValueError(f"Progress total={total}; expected >= 0 or None.")
    self.total, self.what = total, what
    self.every_seconds, self.every_items = every_seconds, every_items
    self._clock = clock or time.monotonic
    self.start = self._clock()
    self._now = self.start
    self._done = 0
    self._fraction: float | None = None
    self._last_line = self.start  # when the last line was logged
    self._last_logged: int | None = None  # the count it logged
    self.lines = 0  # lines logged so far

  @property
  def elapsed_seconds(self) -> float:
    """Seconds from the start to the last update."""
    return self._now - self.start

  @property
  def rate(self) -> float:
    """Items per second, from the start to the last update."""
    return self._done / max(self.elapsed_seconds, 1e-9)

  @property
  def fraction(self) -> float | None:
    """The fraction done (None when neither total nor a fraction is known)."""
    if self._fraction is not None:
      return self._fraction
    if self.total:
      return self._done / self.total
    return 1.0 if self.total == 0 else None

  @property
  def eta_seconds(self) -> float:
    """Seconds left at the rate so far (inf when unknown)."""
    fraction = self.fraction
    if fraction is None or fraction <= 0:
      return float("inf")
    if self._fraction is None and self.total:
      rate = self.rate
      return (self.total - self._done) / rate if rate > 0 else float("inf")
    return self.elapsed_seconds * max(1.0 - fraction, 0.0) / fraction

  def update(self, done: int, *, fraction: float | None = None,
             extra: str = "", force: bool = False) -> bool:
    """Records `done` items (an absolute count); logs a line when due.

    Args:
      done: items done so far.
      fraction: the fraction done by another measure, when total is None.
      extra: appended to the line (e.g. the current loss).
      force: log now, whatever the time since the last line.

    Returns:
      Whether a line was logged.
    """
    self._now, self._done = self._clock(), int(done)
    if fraction is not None:
      self._fraction = float(fraction)
    if done == self._last_logged and not extra:
      return False  # this count is logged already
    if self.total is not None and done >= self.total and not force:
      return self.finish(extra=extra)
    due = (force or self._now - self._last_line >= self.every_seconds or
           (self.every_items is not None and
            done - (self._last_logged or 0) >= self.every_items))
    if due:
      self._log(extra)
    return due

  def finish(self, done: int | None = None, *, extra: str = "") -> bool:
    """Logs a closing line if an earlier line was logged or the work took
    longer than every_seconds; returns whether it logged."""
    if done is not None:
      self._now, self._done = self._clock(), int(done)
    else:
      self._now = self._clock()
    if self._done == self._last_logged and not extra:
      return False
    if self.lines or self.elapsed_seconds >= self.every_seconds:
      self._log(extra)
      return True
    return False

  def _log(self, extra: str) -> None:
    self._last_line, self._last_logged = self._now, self._done
    self.lines += 1
    if self.total is not None:
      count = f"{self._done}/{self.total}"
    else:
      count = f"{self._done}"
    fraction = self.fraction
    percent = f" ({100.0 * fraction:.1f}%)" if fraction is not None else ""
    line = (f"{self.what}: {count}{percent}, {self.rate:.1f}/s, elapsed "
            f"{format_seconds(self.elapsed_seconds)}")
    if fraction is not None:
      line += f", ETA {format_seconds(self.eta_seconds)}"
    logging.info("%s%s.", line, f"; {extra}" if extra else "")
