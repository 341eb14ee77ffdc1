#!/usr/bin/env bash
# The old spelling of launch/tpu_vm.sh, kept for existing command lines:
#   launch/tpu_pod.sh TPU ZONE ARGS...  ==  launch/tpu_vm.sh --name TPU --zone ZONE \
#                                             --allow-local-workdir -- ARGS...
# (WORKDIR: a gs:// path, mounted on every worker, or a disk every worker mounts.)
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; shift 2
exec "$(dirname "${BASH_SOURCE[0]}")/tpu_vm.sh" --name "$TPU" --zone "$ZONE" \
  --allow-local-workdir -- "$@"
