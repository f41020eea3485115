# Shared by the launch scripts (sourced, not run).
# shellcheck shell=bash

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
