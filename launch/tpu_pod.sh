#!/usr/bin/env bash
# Trains / evaluates / samples with unimm on a Cloud TPU pod slice.
#
# Usage: launch/tpu_pod.sh --name NAME --zone ZONE [options] -- UNIMM_MAIN_ARGS...
#
# Example:
#   launch/tpu_pod.sh --name unimm-v4 --zone us-central2-b --accelerator v4-32 \
#       -- --config configs/parti_shapes.py:size=350m --workdir gs://BUCKET/parti350m
#
# Steps (each printed before it runs; --dry-run prints them and runs nothing):
#   1. reuse the TPU VM NAME if it exists, else create it (directly, or as a
#      queued resource with --queued, waiting until it is ACTIVE; --spot for
#      spot capacity);
#   2. copy this checkout (git ls-files, uncommitted edits included) to every
#      worker and pip install it with the TPU extra (jax[tpu]);
#   3. run `python3 -m unimm.main ARGS` on all workers at once (--worker=all);
#      jax.distributed finds the pod's topology itself (UNIMM_DISTRIBUTED=1).
#      Logs stream to this terminal (and to ~/unimm.log on each worker);
#      with --detach the run goes on under nohup and `--logs` reattaches to
#      worker 0's log later;
#   4. with --delete, delete the TPU VM (queued resource) at the end; alone,
#      `launch/tpu_pod.sh --name N --zone Z --delete` only deletes.
# The workdir must be on storage that every worker sees (gs://...).
#
# Options:
#   --name NAME            TPU VM (and queued resource) name          (required)
#   --zone ZONE            e.g. us-central2-b (v4), us-east5-a (v5p)  (required)
#   --accelerator TYPE     e.g. v4-32, v5p-64, v5litepod-16; needed to create;
#                          `python -m unimm.plan --table` says which fits
#   --version VERSION      TPU runtime (default tpu-ubuntu2204-base)
#   --project PROJECT      gcloud project (default: gcloud's)
#   --queued               create through a queued resource
#   --spot                 spot (preemptible) capacity; the trainer saves a
#                          checkpoint on SIGTERM and resumes on restart
#   --no_install           skip step 2 (code already installed)
#   --detach               do not stream; run under nohup on the workers
#   --logs                 stream worker 0's ~/unimm.log, then exit
#   --delete               delete the slice when done
#   --dry-run              print every command, run nothing
#   -h, --help             print this help
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=launch/common.sh
source launch/common.sh

name="" zone="" accelerator="" version="tpu-ubuntu2204-base" project=""
queued=0 spot=0 install=1 detach=0 logs=0 delete=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name="${2:?--name needs a value}"; shift 2 ;;
    --zone) zone="${2:?--zone needs a value}"; shift 2 ;;
    --accelerator) accelerator="${2:?--accelerator needs a value}"; shift 2 ;;
    --version) version="${2:?--version needs a value}"; shift 2 ;;
    --project) project="${2:?--project needs a value}"; shift 2 ;;
    --queued) queued=1; shift ;;
    --spot) spot=1; shift ;;
    --no_install) install=0; shift ;;
    --detach) detach=1; shift ;;
    --logs) logs=1; shift ;;
    --delete) delete=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option $1 (launcher options come first, then -- and the unimm.main arguments; see $0 --help)." ;;
  esac
done
[[ -n "${name}" ]] || die "--name is required (the TPU VM's name)."
[[ -n "${zone}" ]] || die "--zone is required (e.g. --zone us-central2-b)."
main_args=("$@")
if [[ ${#main_args[@]} -eq 0 && "${delete}" == 0 && "${logs}" == 0 ]]; then
  die "nothing to do: give the unimm.main arguments after -- (e.g. -- --config configs/x.py --workdir gs://BUCKET/run), or --logs, or --delete."
fi

gcloud_tpu=(gcloud compute tpus)
where=("--zone=${zone}")
if [[ -n "${project}" ]]; then
  where+=("--project=${project}")
fi
ssh_all=("${gcloud_tpu[@]}" tpu-vm ssh "${name}" "${where[@]}" --worker=all)

exists() {
  # In a dry run nothing is asked: the plan shows the create commands.
  [[ "${DRY_RUN}" == 0 ]] && "${gcloud_tpu[@]}" tpu-vm describe "${name}" "${where[@]}" > /dev/null 2>&1
}

create() {
  [[ -n "${accelerator}" ]] || die "TPU VM ${name} does not exist; give --accelerator (e.g. v4-32) to create it."
  local capacity=()
  if [[ "${spot}" == 1 ]]; then capacity=(--spot); fi
  if [[ "${queued}" == 1 ]]; then
    run "${gcloud_tpu[@]}" queued-resources create "${name}" --node-id="${name}" \
      "${where[@]}" --accelerator-type="${accelerator}" \
      --runtime-version="${version}" "${capacity[@]}"
    echo "# waiting for queued resource ${name} to become ACTIVE"
    if [[ "${DRY_RUN}" == 0 ]]; then
      local state=""
      until [[ "${state}" == ACTIVE ]]; do
        state=$("${gcloud_tpu[@]}" queued-resources describe "${name}" \
          "${where[@]}" --format='value(state.state)')
        case "${state}" in
          FAILED|SUSPENDED) die "queued resource ${name} is ${state}." ;;
        esac
        echo "# ${name}: ${state:-pending}"; sleep 30
      done
    fi
  else
    run "${gcloud_tpu[@]}" tpu-vm create "${name}" "${where[@]}" \
      --accelerator-type="${accelerator}" --version="${version}" "${capacity[@]}"
  fi
}

install_code() {
  local tarball=/tmp/unimm-src.tar.gz
  echo "# packing this checkout (tracked files, as they are now)"
  if [[ "${DRY_RUN}" == 0 ]]; then
    git ls-files -z | tar --null -T - -czf "${tarball}"
  fi
  run "${gcloud_tpu[@]}" tpu-vm scp "${tarball}" "${name}:unimm-src.tar.gz" \
    "${where[@]}" --worker=all
  run "${ssh_all[@]}" --command="rm -rf ~/unimm && mkdir -p ~/unimm && tar -xzf ~/unimm-src.tar.gz -C ~/unimm && cd ~/unimm && python3 -m pip install -q -e '.[tpu]'"
}

if [[ "${logs}" == 1 ]]; then
  run "${gcloud_tpu[@]}" tpu-vm ssh "${name}" "${where[@]}" --worker=0 \
    --command="tail -n +1 -F ~/unimm.log"
  exit 0
fi

if [[ ${#main_args[@]} -gt 0 ]]; then
  echo "# reuse TPU VM ${name} if it exists, else create it"
  if exists; then
    echo "# ${name} exists: reusing it"
  else
    create
  fi
  if [[ "${install}" == 1 ]]; then
    install_code
  fi
  remote="set -o pipefail; cd ~/unimm && UNIMM_DISTRIBUTED=1 python3 -m unimm.main $(quote_args "${main_args[@]}")"
  if [[ "${detach}" == 1 ]]; then
    run "${ssh_all[@]}" --command="nohup bash -c ${remote@Q} > ~/unimm.log 2>&1 &"
    echo "# detached; follow with: $0 --name ${name} --zone ${zone} --logs"
  else
    run "${ssh_all[@]}" --command="${remote} 2>&1 | tee ~/unimm.log"
  fi
fi

if [[ "${delete}" == 1 ]]; then
  if [[ "${queued}" == 1 ]]; then
    run "${gcloud_tpu[@]}" queued-resources delete "${name}" "${where[@]}" --force --quiet
  else
    run "${gcloud_tpu[@]}" tpu-vm delete "${name}" "${where[@]}" --quiet
  fi
fi
