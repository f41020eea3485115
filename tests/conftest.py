"""Test set-up: 8 simulated CPU devices, the allowed skips, shared fixtures.

docs/testing.md describes the suite, the allowed skips and `--run-slow`.
"""
import collections
import os
import pathlib
from typing import NamedTuple

# Must be set before jax is imported anywhere. Most of the suite's time is
# XLA compiling tiny programs: the tests compile without LLVM's optimisation
# passes, which halves that and changes no result a test checks (the
# programs run the same operations; only the machine code is less tuned).
os.environ.setdefault(
    "XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
    "--xla_backend_optimization_level=0 "
    "--xla_llvm_disable_expensive_passes=true")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# TensorFlow (pulled in by clu/tfds) must not grab the GPU or all CPU threads.
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

from absl import flags  # noqa: E402
import pytest  # noqa: E402

from unimm import host_memory  # noqa: E402

# As the entry points do: reuse freed host memory (unimm/host_memory.py).
host_memory.keep_freed_memory()

# grain worker processes read absl flags; tests do not go through app.run.
flags.FLAGS.mark_as_parsed()


# ---------------------------------------------------------------------------
# Skips: only these may happen. Any other skipped test or module (a skip
# marker, pytest.skip, pytest.importorskip of a missing package) fails the
# run. Keep in sync with docs/testing.md.


class AllowedSkip(NamedTuple):
  nodeid_prefix: str  # relative to the repository root
  reason: str  # a substring of the skip's reason
  most: int  # how many tests this entry may skip in one run


ALLOWED_SKIPS = (
    # The real file is not in the repository; a written file in its format
    # is tested everywhere (test_read_prompts_in_parti_format).
    AllowedSkip("tests/tokenizers/test_text.py::test_read_real_parti_prompts",
                "PartiPrompts.tsv is absent", 1),
    # The malloc options are glibc's (musl and macOS have none).
    AllowedSkip("tests/test_host_memory.py::"
                "test_freed_buffers_are_reused_not_refaulted",
                "the options are glibc's", 1),
)


def _skip_reason(report) -> str:
  """The reason of a skipped test or collection report."""
  longrepr = report.longrepr
  if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, msg)
    reason = longrepr[2]
  else:
    reason = str(longrepr)
  return reason.removeprefix("Skipped: ")


def unexpected_skips(skips: dict[str, str],
                     allowed=ALLOWED_SKIPS) -> list[str]:
  """Lines naming the skips {nodeid: reason} that `allowed` does not admit:
  those matching no entry, and those past an entry's `most`."""
  used = collections.Counter()
  problems = []
  for nodeid, reason in sorted(skips.items()):
    entry = next((a for a in allowed if nodeid.startswith(a.nodeid_prefix)
                  and a.reason in reason), None)
    if entry is None:
      problems.append(f"{nodeid}: {reason}")
      continue
    used[entry] += 1
    if used[entry] > entry.most:
      problems.append(f"{nodeid}: {reason} (more than the {entry.most} "
                      f"allowed for {entry.nodeid_prefix!r})")
  return problems


# {nodeid: reason} of every skipped test and module this process saw: under
# pytest-xdist the controller is handed each worker's reports, so there it
# is the whole run's.
_skipped: dict[str, str] = {}
_unexpected: list[str] = []


def _record_skip(report) -> None:
  # An xfail result is reported as skipped too; it is no skip.
  if report.skipped and not hasattr(report, "wasxfail"):
    _skipped.setdefault(report.nodeid, _skip_reason(report))


def pytest_configure(config):
  config.addinivalue_line(
      "markers", "slow: minutes of CPU; collected only with --run-slow "
      "(docs/testing.md)")
  # pytest-xdist hands out files with the most tests first, which puts the
  # long one-test files (the recipes, the Colabs) last; keep the collection
  # order instead (LONGEST_FILES first, below).
  if hasattr(config.option, "loadscopereorder"):
    config.option.loadscopereorder = False


def pytest_runtest_logreport(report):
  _record_skip(report)


def pytest_collectreport(report):
  # A module-level pytest.importorskip (or pytest.skip with
  # allow_module_level) skips the whole module at collection; pytest-xdist
  # forwards such reports to the controller once, though every worker
  # collects.
  _record_skip(report)


def pytest_sessionfinish(session, exitstatus):
  if hasattr(session.config, "workerinput"):
    return  # a pytest-xdist worker: the controller counts
  _unexpected[:] = unexpected_skips(_skipped)
  if _unexpected and exitstatus in (pytest.ExitCode.OK,
                                    pytest.ExitCode.NO_TESTS_COLLECTED):
    session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
  if not _unexpected:
    return
  terminalreporter.section("unexpected skips", sep="=", red=True, bold=True)
  terminalreporter.line(
      f"{len(_unexpected)} skip(s) that tests/conftest.py ALLOWED_SKIPS "
      "does not list (docs/testing.md): the run fails.", red=True)
  for line in _unexpected:
    terminalreporter.line(f"UNEXPECTED SKIP {line}", red=True)


# ---------------------------------------------------------------------------
# Slow tests: minutes of CPU each, left out unless --run-slow is given.


def pytest_addoption(parser):
  parser.addoption("--run-slow", action="store_true", default=False,
                   help="also run the tests marked slow (docs/testing.md)")


# The files that take longest (a minute or more of CPU each), run first:
# `--dist loadfile` then hands files to the two workers in collection order
# (pytest_configure), and no long file is left to keep one worker busy at
# the end while the other idles.
LONGEST_FILES = (
    "tests/test_end_to_end.py",
    "tests/train/test_multihost.py",
    "tests/test_colab_text_to_image.py",
    "tests/train/test_interleaved_task.py",
    "tests/test_colab_interleaved.py",
    "tests/test_own_data_interleaved.py",
    "tests/test_colabs.py",
    "tests/test_own_data.py",
    "tests/train/test_image_input_task.py",
    "tests/test_sharding_modes.py",
    "tests/train/test_detokenizer_task.py",
    "tests/train/test_image_output_task.py",
    "tests/test_main.py",
    "tests/test_export.py",
)


def _file_rank(item) -> int:
  path = item.nodeid.split("::")[0]
  return (LONGEST_FILES.index(path) if path in LONGEST_FILES
          else len(LONGEST_FILES))


def pytest_collection_modifyitems(config, items):
  items.sort(key=_file_rank)  # stable: the other files keep their order
  if config.getoption("--run-slow"):
    return
  slow = [item for item in items if item.get_closest_marker("slow")]
  if slow:
    # Deselected, not skipped: the default run does not count them as skips.
    config.hook.pytest_deselected(items=slow)
    items[:] = [item for item in items if not item.get_closest_marker("slow")]


# ---------------------------------------------------------------------------
# Shared fixtures.


class PromptsFile(NamedTuple):
  path: pathlib.Path
  prompts: list[str]  # the Prompt column, in order
  rows: tuple[tuple[str, str, str, str], ...]  # without the header


# Rows as PartiPrompts.tsv has them (Prompt, Category, Challenge, Note; tab
# separated, no quoting, UTF-8, many Notes empty). All but the last are
# copied from it; the last is made up (an unbalanced quote, commas, brackets).
PARTI_FORMAT_ROWS = (
    ("bond", "Abstract", "Basic",
     "Biology-inspired concepts with multiple meanings"),
    ("peace", "Abstract", "Basic", ""),
    ('"G I G G L E" painted in thick colorful lettering as graffiti on a '
     "faded red brick wall with a splotch of exploding white paint.",
     "Illustrations", "Writing & Symbols", ""),
    ('A robot painted as graffiti on a brick wall. The words "Fly an '
     'airplane" are written on the wall. A sidewalk is in front of the '
     "wall, and grass is growing out of cracks in the concrete.",
     "Outdoor Scenes", "Complex", ""),
    ("Salvador Dalí", "People", "Basic", ""),
    ("a corgi’s head depicted as an explosion of a nebula", "Animals",
     "Fine-grained Detail", "DALL-E 2"),
    ("Oil-on-canvas painting of a blue night sky with roiling energy. A "
     "fuzzy and bright yellow crescent moon shining at the top. Below the "
     "exploding yellow stars and radiating swirls of blue, a distant "
     "village sits quietly on the right. Connecting earth and sky is a "
     "flame-like cypress tree with curling and swaying branches on the "
     "left. A church spire rises as a beacon over rolling blue hills",
     "Arts", "Complex", "Description of The Starry Night"),
    ("a sign that says 'open, 24/7 (with a typo: \"opne)", "Artifacts",
     "Writing & Symbols", "quotes, commas, brackets"),
)
PARTI_FORMAT_HEADER = ("Prompt", "Category", "Challenge", "Note")


@pytest.fixture
def parti_prompts_tsv(tmp_path) -> PromptsFile:
  """A prompts file written in PartiPrompts.tsv's format."""
  path = tmp_path / "PartiPrompts.tsv"
  lines = ["\t".join(row) for row in (PARTI_FORMAT_HEADER,
                                      *PARTI_FORMAT_ROWS)]
  path.write_text("\n".join(lines) + "\n", encoding="utf-8")
  return PromptsFile(path, [row[0] for row in PARTI_FORMAT_ROWS],
                     PARTI_FORMAT_ROWS)
