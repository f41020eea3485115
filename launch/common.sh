# Shared by the launch scripts (sourced, not run): run(), die(), usage().
# shellcheck shell=bash

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  echo "launch/common.sh holds the helpers that the launch scripts source; run"
  echo "launch/local.sh, launch/tpu_pod.sh or launch/gpu_slurm.sh (each takes --help)."
  exit 0
fi

DRY_RUN=0

# Prints a command exactly as it would run (shell-quoted), then runs it
# unless --dry-run was given.
run() {
  echo "+ $(quote_args "$@")"
  if [[ "${DRY_RUN}" == 0 ]]; then
    "$@"
  fi
}

die() {
  echo "error: $*" >&2
  exit 2
}

# The arguments as one shell-quoted line: plain words as they are, others
# in single quotes ('a b' -> 'a b', it's -> 'it'\''s').
quote_args() {
  local out="" arg
  for arg in "$@"; do
    if [[ "${arg}" =~ ^[A-Za-z0-9_./:=,@%+^-]+$ ]]; then
      out+=" ${arg}"
    else
      out+=" ${arg@Q}"
    fi
  done
  printf '%s' "${out# }"
}

# Prints the running script's help: the comment block at its top (after the
# #! line), without the leading "# ". The scripts cd to the repository root
# before sourcing this file, so the script is read from launch/.
usage() {
  local line
  while IFS= read -r line; do
    [[ "${line}" == "#!"* ]] && continue
    [[ "${line}" == "#"* ]] || break
    line="${line#\#}"
    echo "${line# }"
  done < "launch/$(basename "$0")"
}
