#!/usr/bin/env bash
# Trains / evaluates / samples with unimm on a SLURM GPU cluster: one process
# per GPU, all joined by jax.distributed (it reads SLURM's environment).
#
# Usage: launch/gpu_slurm.sh [options] -- UNIMM_MAIN_ARGS...
#
# Example:
#   launch/gpu_slurm.sh --nodes 4 --gpus_per_node 8 --partition a100 \
#       -- --config configs/parti_shapes.py:size=350m --workdir /shared/runs/parti350m
#
# Writes the batch script to <logs>/unimm-<time>.sbatch and submits it with
# sbatch; the job runs `srun python -m unimm.main ARGS` with
# --ntasks-per-node = GPUs per node, so each task is one process owning one
# GPU (jax maps SLURM_LOCALID to its local device). Then follows the job's
# log (Ctrl-C stops following, not the job). --dry-run prints the batch
# script and the commands, and submits nothing.
#
# Options:
#   --nodes N              nodes (default 1)
#   --gpus_per_node G      GPUs (= processes) per node (default 8)
#   --cpus_per_task C      CPU cores per process, for data loading (default 8)
#   --partition P          SLURM partition (default: the cluster's)
#   --account A            SLURM account
#   --time HH:MM:SS        time limit (default 24:00:00)
#   --job_name NAME        (default unimm)
#   --logs DIR             where the batch script and logs go (default slurm_logs)
#   --venv DIR             a virtualenv to activate in the job (pip install -e '.[gpu]')
#   --no_follow            submit and return
#   --dry-run              print the batch script and commands, run nothing
#   -h, --help             print this help
# The workdir must be on a file system that every node sees.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

nodes=1 gpus=8 cpus=8 partition="" account="" time_limit="24:00:00"
job_name=unimm logs=slurm_logs venv="" follow=1
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes="${2:?--nodes needs a number}"; shift 2 ;;
    --gpus_per_node) gpus="${2:?--gpus_per_node needs a number}"; shift 2 ;;
    --cpus_per_task) cpus="${2:?--cpus_per_task needs a number}"; shift 2 ;;
    --partition) partition="${2:?--partition needs a value}"; shift 2 ;;
    --account) account="${2:?--account needs a value}"; shift 2 ;;
    --time) time_limit="${2:?--time needs a value}"; shift 2 ;;
    --job_name) job_name="${2:?--job_name needs a value}"; shift 2 ;;
    --logs) logs="${2:?--logs needs a directory}"; shift 2 ;;
    --venv) venv="${2:?--venv needs a directory}"; shift 2 ;;
    --no_follow) follow=0; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (launcher options come first, then -- and the unimm.main arguments; see $0 --help)." ;;
  esac
done
for setting in nodes gpus cpus; do
  [[ "${!setting}" =~ ^[1-9][0-9]*$ ]] || die "--${setting/gpus/gpus_per_node} ${!setting}: expected a positive integer."
done
[[ $# -gt 0 ]] || die "give the unimm.main arguments after -- (e.g. -- --config configs/x.py --workdir /shared/run)."

script="${logs}/${job_name}-$(date +%Y%m%d-%H%M%S).sbatch"
{
  echo "#!/usr/bin/env bash"
  echo "#SBATCH --job-name=${job_name}"
  echo "#SBATCH --nodes=${nodes}"
  echo "#SBATCH --ntasks-per-node=${gpus}"
  echo "#SBATCH --gpus-per-node=${gpus}"
  echo "#SBATCH --cpus-per-task=${cpus}"
  echo "#SBATCH --time=${time_limit}"
  echo "#SBATCH --output=${logs}/%x-%j.log"
  # SIGTERM 120 s before the time limit: the trainer saves a checkpoint.
  echo "#SBATCH --signal=TERM@120"
  if [[ -n "${partition}" ]]; then echo "#SBATCH --partition=${partition}"; fi
  if [[ -n "${account}" ]]; then echo "#SBATCH --account=${account}"; fi
  echo "set -euo pipefail"
  echo "cd $(quote_args "${PWD}")"
  if [[ -n "${venv}" ]]; then echo "source $(quote_args "${venv}/bin/activate")"; fi
  echo "# jax.distributed.initialize() reads SLURM_* (coordinator = first node)."
  echo "export UNIMM_DISTRIBUTED=1"
  echo "# 90% of each GPU for XLA, the rest for NCCL and CUDA workspaces."
  echo "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9"
  echo "srun --kill-on-bad-exit=1 python -m unimm.main $(quote_args "$@")"
} > /tmp/unimm-sbatch.$$
echo "# batch script ${script}:"
sed 's/^/#   /' /tmp/unimm-sbatch.$$
run mkdir -p "${logs}"
run cp /tmp/unimm-sbatch.$$ "${script}"
rm -f /tmp/unimm-sbatch.$$
if [[ "${DRY_RUN}" == 1 ]]; then
  echo "+ sbatch --parsable $(quote_args "${script}")"
  echo "+ tail -n +1 -F ${logs}/${job_name}-JOBID.log"
  exit 0
fi
job_id=$(sbatch --parsable "${script}")
echo "# submitted job ${job_id}; cancel with: scancel ${job_id}"
if [[ "${follow}" == 1 ]]; then
  log="${logs}/${job_name}-${job_id}.log"
  until [[ -f "${log}" ]]; do sleep 5; done
  tail -n +1 -F "${log}"
fi
