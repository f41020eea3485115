"""launch/*.sh --help / -h: the options and an example, exit 0, run nothing."""
import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(ROOT, script), *args],
                        capture_output=True, text=True, timeout=60, cwd="/")


@pytest.mark.parametrize("script,options", [
    ("launch/local.sh", ("--devices", "--processes", "--port", "--dry-run")),
    ("launch/tpu_pod.sh", ("--name", "--zone", "--accelerator", "--queued",
                           "--spot", "--delete", "--dry-run")),
    ("launch/gpu_slurm.sh", ("--nodes", "--gpus_per_node", "--partition",
                             "--venv", "--dry-run")),
])
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_lists_the_options_and_an_example(script, options, flag):
  result = _run(script, flag)
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith(("Runs", "Trains")), result.stdout
  assert f"Usage: {script}" in result.stdout
  assert "--help" in result.stdout
  for option in options:
    assert option in result.stdout, option
  # The example is a whole command line of the script itself.
  assert any(line.strip().startswith(f"{script} --")
             for line in result.stdout.splitlines())
  assert not any(line.startswith("+ ") for line in result.stdout.splitlines())


def test_common_sh_run_directly_points_to_the_scripts():
  result = _run("launch/common.sh", "--help")
  assert result.returncode == 0
  assert "launch/tpu_pod.sh" in result.stdout
