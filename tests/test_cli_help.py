"""Every app answers --help with its options and an example (the tools in
unimm/tools/ and the launch scripts have their own tests)."""
import os
import subprocess
import sys

import pytest

APPS = {
    "unimm.main": ("--config", "--workdir", "--mode", "--output_dir",
                   "--images", "Example:"),
    "unimm.export": ("--workdir", "--out", "--step", "Example:"),
    "unimm.plan": ("--config", "--mesh", "Example:"),
}


@pytest.mark.parametrize("app", sorted(APPS))
def test_help_lists_options_and_an_example(app):
  result = subprocess.run(
      [sys.executable, "-m", app, "--help"], capture_output=True, text=True,
      timeout=120, check=False, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode in (0, 1), result.stderr[-2000:]  # absl: 1
  for word in APPS[app]:
    assert word in result.stdout, (word, result.stdout[:2000])
