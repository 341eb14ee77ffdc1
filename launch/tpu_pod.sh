#!/usr/bin/env bash
# Runs the same command on every host of a Cloud TPU VM slice; jax.distributed.initialize()
# discovers the slice. WORKDIR must be shared storage (a gs:// bucket or a mounted disk).
#   launch/tpu_pod.sh my-tpu us-central2-b distill --config configs/cifar10/resnet8x4_kd.py \
#       --workdir gs://bucket/kd --config.teacher.workdir=gs://bucket/teacher
set -euo pipefail
TPU=${1:?TPU name}; ZONE=${2:?zone}; shift 2
gcloud compute tpus tpu-vm ssh "$TPU" --zone "$ZONE" --worker=all --command \
  "cd ~/kdjax && KDJAX_DISTRIBUTED_AUTO=1 python -m kdjax $*"
