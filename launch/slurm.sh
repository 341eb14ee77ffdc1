#!/usr/bin/env bash
# Submits one kdjax command to SLURM as one JAX process per GPU. The batch script it writes
# runs `srun python -m kdjax ARGS` with --ntasks-per-node equal to the GPUs per node and
# KDJAX_DISTRIBUTED_AUTO=1: jax.distributed.initialize() reads the job from SLURM's
# environment (coordinator: the first node; process id: SLURM_PROCID) and, as one process
# per GPU is assumed under SLURM, gives each task the GPU numbered SLURM_LOCALID.
#
#   launch/slurm.sh --nodes 4 --gpus-per-node 8 [--partition gpu] [--time 24:00:00] \
#       -- distill --config configs/cifar10/resnet8x4_kd.py --workdir /shared/kd \
#       --config.teacher.workdir=/shared/teacher
#
# Options (before the --; everything after it is the kdjax command):
#   --nodes N              nodes (default 1)
#   --gpus-per-node G      GPUs per node, and so JAX processes per node (default 8)
#   --time T               time limit (default 24:00:00); 120 s before it SLURM sends
#                          SIGTERM, kdjax checkpoints and exits; resubmit to resume
#   --partition P  --account A  --job-name NAME (default kdjax)  --cpus-per-task C
#   --python PY            the interpreter on the nodes (default: python; sbatch passes this
#                          shell's environment, an activated virtualenv included)
#   --env KEY=VALUE        extra environment for kdjax (repeatable)
#   --sbatch-arg ARG       one more sbatch option, e.g. --sbatch-arg=--qos=high (repeatable)
#   --dry-run              print the submission (sbatch with the batch script as a shell
#                          here-document: pasting it submits it) and submit nothing
#                          (KDJAX_DRY_RUN=1 in the environment does the same)
#
# The workdir must be on storage every node mounts. Every task sees all GPUs of its node (no
# --gpus-per-task, no per-task CUDA_VISIBLE_DEVICES): JAX picks GPU SLURM_LOCALID itself, and
# that index would not exist in a task shown a single GPU.
set -euo pipefail

die() { echo "error: $*" >&2; exit 2; }

# One word in POSIX shell syntax: as it is when every character is safe, else single-quoted.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}
quote_all() {
  local words=() w
  for w in "$@"; do words+=("$(quote "$w")"); done
  local IFS=' '
  printf '%s' "${words[*]}"
}

NODES=1 GPUS=8 TIME=24:00:00 PARTITION='' ACCOUNT='' JOB_NAME=kdjax CPUS='' PYTHON=python
DRY_RUN=0
[[ ${KDJAX_DRY_RUN:-} != 1 ]] || DRY_RUN=1
ENVS=() SBATCH_ARGS=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then set -- "${arg#*=}" "$@"; arg=${arg%%=*}; fi
  case $arg in
    --) break ;;
    --nodes | --gpus-per-node | --time | --partition | --account | --job-name | --cpus-per-task | \
      --python | --env | --sbatch-arg)
      (($#)) || die "$arg needs a value; see --help."
      value=$1
      shift
      case $arg in
        --nodes) NODES=$value ;;
        --gpus-per-node) GPUS=$value ;;
        --time) TIME=$value ;;
        --partition) PARTITION=$value ;;
        --account) ACCOUNT=$value ;;
        --job-name) JOB_NAME=$value ;;
        --cpus-per-task) CPUS=$value ;;
        --python) PYTHON=$value ;;
        --env) ENVS+=("$value") ;;
        --sbatch-arg) SBATCH_ARGS+=("$value") ;;
      esac
      ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $arg; put the kdjax command after --, see --help." ;;
  esac
done
ARGS=("$@")

((${#ARGS[@]})) ||
  die "no kdjax command; put it after --, e.g. -- distill --config FILE --workdir /shared/run."
[[ $NODES =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got '$NODES'."
[[ $GPUS =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got '$GPUS'."
[[ -z $CPUS || $CPUS =~ ^[1-9][0-9]*$ ]] ||
  die "--cpus-per-task must be a positive integer, got '$CPUS'."
for v in "$TIME" "$PARTITION" "$ACCOUNT" "$JOB_NAME"; do
  [[ $v != *[[:space:]]* ]] || die "'$v' has a space; #SBATCH values cannot."
done
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE."
done

script="#!/usr/bin/env bash
#SBATCH --job-name=$JOB_NAME
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$GPUS
#SBATCH --gpus-per-node=$GPUS
#SBATCH --time=$TIME
#SBATCH --signal=TERM@120"
[[ -z $PARTITION ]] || script+=$'\n'"#SBATCH --partition=$PARTITION"
[[ -z $ACCOUNT ]] || script+=$'\n'"#SBATCH --account=$ACCOUNT"
[[ -z $CPUS ]] || script+=$'\n'"#SBATCH --cpus-per-task=$CPUS"
script+="
# One JAX process per GPU ($GPUS tasks per node, each seeing the node's GPUs; JAX gives task
# SLURM_LOCALID that GPU). SIGTERM 120 s before the time limit: kdjax checkpoints and exits.
set -euo pipefail
export KDJAX_DISTRIBUTED_AUTO=1"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do script+=$'\n'"export ${kv%%=*}=$(quote "${kv#*=}")"; done
script+=$'\n'"srun --kill-on-bad-exit=1 $(quote "$PYTHON") -m kdjax $(quote_all "${ARGS[@]}")"

SBATCH=(sbatch ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"})
if ((DRY_RUN)); then
  echo "$(quote_all "${SBATCH[@]}") <<'KDJAX_SBATCH'"
  printf '%s\n' "$script" KDJAX_SBATCH
else
  printf '%s\n' "$script" | "${SBATCH[@]}"
fi
