#!/usr/bin/env bash
# Runs unimm on this machine: every argument goes to unimm.main.
#   launch/local.sh --config configs/vit_vqgan_shapes.py --workdir workdirs/tokenizer
# To simulate N devices on a CPU: UNIMM_HOST_DEVICES=8 launch/local.sh ...
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -n "${UNIMM_HOST_DEVICES:-}" ]]; then
  export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=${UNIMM_HOST_DEVICES}"
fi
exec python -m unimm.main "$@"
