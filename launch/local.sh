#!/usr/bin/env bash
# Runs unimm.main on this machine; everything after the launcher's own
# options (or after --) goes to unimm.main.
#
# Usage: launch/local.sh [launcher options] [--] UNIMM_MAIN_ARGS...
#
# Examples:
#   launch/local.sh --config configs/shapes_demo.py --workdir workdirs/demo
#   launch/local.sh --devices 8 -- --config configs/vit_vqgan_shapes.py --workdir w
#   launch/local.sh --processes 2 --devices 4 --dry-run -- --config ... --workdir w
#
# Launcher options:
#   --devices N     simulate N CPU devices per process
#                   (XLA_FLAGS=--xla_force_host_platform_device_count=N)
#   --processes P   start P processes on localhost joined by jax.distributed
#                   (UNIMM_COORDINATOR_ADDRESS / _NUM_PROCESSES / _PROCESS_ID),
#                   as on P hosts; logs of process i go to
#                   <workdir>/logs/process_i.log, process 0's also to the console
#   --port PORT     coordinator port for --processes (default 12355)
#   --dry-run       print the commands and their environment, run nothing
#   -h, --help      print this help
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

devices="${UNIMM_HOST_DEVICES:-}"
processes=1
port=12355
while [[ $# -gt 0 ]]; do
  case "$1" in
    --devices) devices="${2:?--devices needs a number}"; shift 2 ;;
    --processes) processes="${2:?--processes needs a number}"; shift 2 ;;
    --port) port="${2:?--port needs a number}"; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) break ;;
  esac
done
[[ "${processes}" =~ ^[1-9][0-9]*$ ]] || die "--processes ${processes}: expected a positive integer."
[[ -z "${devices}" || "${devices}" =~ ^[1-9][0-9]*$ ]] || die "--devices ${devices}: expected a positive integer."

env_args=()
if [[ -n "${devices}" ]]; then
  # Other XLA flags are kept; an earlier device count is replaced.
  xla_flags=$(sed -E 's/ *--xla_force_host_platform_device_count=[0-9]+//g; s/^ +//' <<< "${XLA_FLAGS:-}")
  env_args+=("XLA_FLAGS=${xla_flags:+${xla_flags} }--xla_force_host_platform_device_count=${devices}")
  env_args+=("JAX_PLATFORMS=cpu")
fi

if [[ "${processes}" == 1 ]]; then
  run env "${env_args[@]}" python -m unimm.main "$@"
  exit 0
fi

# Several processes: find --workdir for the per-process logs.
workdir=""
for ((i = 1; i <= $#; i++)); do
  case "${!i}" in
    --workdir=*) workdir="${!i#--workdir=}" ;;
    --workdir) j=$((i + 1)); workdir="${!j:-}" ;;
  esac
done
[[ -n "${workdir}" ]] || die "--processes ${processes} needs --workdir among the unimm.main arguments (for the logs)."
run mkdir -p "${workdir}/logs"
pids=()
for ((p = 0; p < processes; p++)); do
  log="${workdir}/logs/process_${p}.log"
  cmd=(env "${env_args[@]}" "UNIMM_COORDINATOR_ADDRESS=localhost:${port}"
       "UNIMM_NUM_PROCESSES=${processes}" "UNIMM_PROCESS_ID=${p}"
       python -m unimm.main "$@")
  echo "+ $(quote_args "${cmd[@]}") > $(quote_args "${log}") 2>&1 &"
  if [[ "${DRY_RUN}" == 0 ]]; then
    "${cmd[@]}" > "${log}" 2>&1 &
    pids+=("$!")
  fi
done
if [[ "${DRY_RUN}" == 1 ]]; then
  exit 0
fi
trap 'kill -TERM "${pids[@]}" 2>/dev/null || true' INT TERM
tail -n +1 -F "${workdir}/logs/process_0.log" &
tail_pid=$!
status=0
for pid in "${pids[@]}"; do
  wait "${pid}" || status=$?
done
kill "${tail_pid}" 2>/dev/null || true
exit "${status}"
