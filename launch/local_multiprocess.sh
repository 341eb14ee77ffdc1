#!/usr/bin/env bash
# Runs a kdjax command as N JAX processes on this machine (jax.distributed over localhost),
# each with D CPU devices. The multi-host code path, testable on one box.
#   launch/local_multiprocess.sh 2 2 train --config configs/mnist1d/teacher.py:tiny --workdir /tmp/t
set -euo pipefail
N=${1:?number of processes}; D=${2:?devices per process}; shift 2
PORT=${KDJAX_PORT:-$((20000 + RANDOM % 20000))}
pids=()
for ((i = 0; i < N; i++)); do
  KDJAX_COORDINATOR="localhost:$PORT" KDJAX_NUM_PROCESSES="$N" KDJAX_PROCESS_ID="$i" \
  JAX_PLATFORMS=cpu JAX_NUM_CPU_DEVICES="$D" python -m kdjax "$@" &
  pids+=($!)
done
rc=0
for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
exit $rc
