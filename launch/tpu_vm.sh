#!/usr/bin/env bash
# Runs one kdjax command on every worker of a Cloud TPU VM slice (gcloud compute tpus tpu-vm
# ssh --worker=all). Each worker starts `python3 -m kdjax ARGS` with KDJAX_DISTRIBUTED_AUTO=1;
# jax.distributed.initialize() finds the slice from the TPU VM's metadata.
#
#   launch/tpu_vm.sh --name my-tpu --zone us-central2-b [--project my-project] [--setup] \
#       -- distill --config configs/cifar10/resnet8x4_kd.py --workdir gs://BUCKET/kd \
#       --config.teacher.workdir=gs://BUCKET/teacher
#
# Options (before the --; everything after it is the kdjax command):
#   --name NAME --zone ZONE   the TPU VM (required); --project PROJECT (default: gcloud's)
#   --setup                   first copy this checkout (tracked and untracked, not ignored
#                             files) to every worker and pip-install it with jax[tpu]
#                             (and gcsfuse when a gs:// argument needs it)
#   --create TYPE --runtime-version VERSION [--spot]
#                             first create the slice as queued resource NAME (node NAME),
#                             e.g. --create v5litepod-16 --runtime-version v2-alpha-tpuv5-lite,
#                             and wait until it is ACTIVE
#   --remote-dir DIR          the code's directory on each worker, relative to the home
#                             directory or absolute (default: kdjax)
#   --env KEY=VALUE           extra environment for kdjax (repeatable)
#   --detach                  start kdjax under nohup (output to kdjax.log in the code's
#                             directory) and return; without it, closing this terminal
#                             ends the run
#   --allow-local-workdir     accept a --workdir that is not gs:// (a disk every worker mounts)
#   --no-gcsfuse              pass gs:// arguments to kdjax unchanged
#   --dry-run                 print the commands, one per line, and run none of them
#                             (KDJAX_DRY_RUN=1 in the environment does the same)
#
# gs:// arguments: kdjax writes its workdir through the local filesystem API, so each
# gs://BUCKET/PATH argument (or --flag=gs://BUCKET/PATH) becomes /mnt/gcs/BUCKET/PATH, and
# every worker mounts BUCKET there with Cloud Storage FUSE before it starts kdjax.
# A --workdir on a worker's own disk is refused: every worker would write its own copy.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GCS_ROOT=/mnt/gcs
REMOTE_TARBALL=kdjax-src.tgz

die() { echo "error: $*" >&2; exit 2; }

# One word in POSIX shell syntax: as it is when every character is safe, else single-quoted
# (what sh, ssh's remote shell and Python's shlex.split all read back as the same word).
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
# Runs a command, or with --dry-run prints it as one line.
run() {
  if ((DRY_RUN)); then quote_all "$@"; echo; else "$@"; fi
}

NAME='' ZONE='' PROJECT='' CREATE='' RUNTIME='' REMOTE_DIR=kdjax
SETUP=0 SPOT=0 DRY_RUN=0 ALLOW_LOCAL=0 GCSFUSE=1 DETACH=0
[[ ${KDJAX_DRY_RUN:-} != 1 ]] || DRY_RUN=1
ENVS=()
while (($#)); do
  arg=$1
  shift
  if [[ $arg == --*=* ]]; then set -- "${arg#*=}" "$@"; arg=${arg%%=*}; fi
  case $arg in
    --) break ;;
    --name | --zone | --project | --create | --runtime-version | --remote-dir | --env)
      (($#)) || die "$arg needs a value; see --help."
      value=$1
      shift
      case $arg in
        --name) NAME=$value ;;
        --zone) ZONE=$value ;;
        --project) PROJECT=$value ;;
        --create) CREATE=$value ;;
        --runtime-version) RUNTIME=$value ;;
        --remote-dir) REMOTE_DIR=$value ;;
        --env) ENVS+=("$value") ;;
      esac
      ;;
    --setup) SETUP=1 ;;
    --spot) SPOT=1 ;;
    --detach) DETACH=1 ;;
    --dry-run) DRY_RUN=1 ;;
    --allow-local-workdir) ALLOW_LOCAL=1 ;;
    --no-gcsfuse) GCSFUSE=0 ;;
    -h | --help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) die "unknown option $arg; put the kdjax command after --, see --help." ;;
  esac
done
ARGS=("$@")

[[ -n $NAME ]] || die "--name (the TPU VM) is required; see --help."
[[ -n $ZONE ]] || die "--zone is required; see --help."
((${#ARGS[@]})) ||
  die "no kdjax command; put it after --, e.g. -- distill --config FILE --workdir gs://BUCKET/run."
[[ -z $CREATE || -n $RUNTIME ]] ||
  die "--create needs --runtime-version (v2-alpha-tpuv5-lite for v5e, tpu-ubuntu2204-base for v4)."
[[ -n $CREATE || ($SPOT -eq 0 && -z $RUNTIME) ]] ||
  die "--spot and --runtime-version only go with --create."
[[ -n $REMOTE_DIR && $REMOTE_DIR != *$'\n'* ]] || die "--remote-dir must be a path."
for kv in ${ENVS[@]+"${ENVS[@]}"}; do
  [[ $kv =~ ^[A-Za-z_][A-Za-z0-9_]*= ]] || die "--env '$kv' is not KEY=VALUE."
done

# The workdir must be storage every worker shares.
for ((i = 0; i < ${#ARGS[@]}; i++)); do
  a=${ARGS[i]} workdir=''
  if [[ $a == --workdir ]] && ((i + 1 < ${#ARGS[@]})); then workdir=${ARGS[i + 1]}; fi
  if [[ $a == --workdir=* ]]; then workdir=${a#--workdir=}; fi
  if [[ -n $workdir && $workdir != gs://* ]] && ((!ALLOW_LOCAL)); then
    die "--workdir $workdir would be on each worker's own disk; use gs://BUCKET/PATH," \
      "or --allow-local-workdir for a disk every worker mounts."
  fi
done

# gs://BUCKET/PATH -> /mnt/gcs/BUCKET/PATH, and the buckets to mount.
BUCKETS=()
if ((GCSFUSE)); then
  for ((i = 0; i < ${#ARGS[@]}; i++)); do
    if [[ ${ARGS[i]} =~ ^(--[^=]+=)?gs://([a-z0-9][-_.a-z0-9]*)(/.*)?$ ]]; then
      bucket=${BASH_REMATCH[2]}
      ARGS[i]="${BASH_REMATCH[1]}$GCS_ROOT/$bucket${BASH_REMATCH[3]}"
      [[ " ${BUCKETS[*]-} " == *" $bucket "* ]] || BUCKETS+=("$bucket")
    fi
  done
fi

WHERE=(--zone="$ZONE")
[[ -z $PROJECT ]] || WHERE+=(--project="$PROJECT")
DIR=$(quote "$REMOTE_DIR")

# 1. The slice, as a queued resource (optional).
if [[ -n $CREATE ]]; then
  CREATE_CMD=(gcloud compute tpus queued-resources create "$NAME" --node-id="$NAME"
    --accelerator-type="$CREATE" --runtime-version="$RUNTIME" "${WHERE[@]}")
  ((!SPOT)) || CREATE_CMD+=(--spot)
  run "${CREATE_CMD[@]}"
  DESCRIBE=(gcloud compute tpus queued-resources describe "$NAME" "${WHERE[@]}"
    --format='value(state.state)')
  if ((DRY_RUN)); then
    run "${DESCRIBE[@]}"   # polled every 30 s until ACTIVE
  else
    while :; do
      state=$("${DESCRIBE[@]}")
      case $state in
        ACTIVE) break ;;
        FAILED | SUSPENDED)
          die "queued resource $NAME is $state; see gcloud compute tpus queued-resources" \
            "describe $NAME --zone=$ZONE" ;;
      esac
      echo "queued resource $NAME: $state; waiting" >&2
      sleep 30
    done
  fi
fi

# 2. The code on every worker (optional).
if ((SETUP)); then
  tarball=${TMPDIR:-/tmp}/kdjax-src-$NAME.tgz
  if ((DRY_RUN)); then
    echo "$(quote_all git -C "$ROOT" ls-files -z --cached --others --exclude-standard) |" \
      "$(quote_all tar -C "$ROOT" --null --ignore-failed-read -T - -czf "$tarball")"
  else
    git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
      tar -C "$ROOT" --null --ignore-failed-read -T - -czf "$tarball"
  fi
  run gcloud compute tpus tpu-vm scp "$tarball" "$NAME:$REMOTE_TARBALL" --worker=all "${WHERE[@]}"
  install="set -e; mkdir -p $DIR; tar -xzf $REMOTE_TARBALL -C $DIR; cd $DIR"
  install+="; python3 -m pip install -q -c requirements.lock -e . 'jax[tpu]'"
  if ((${#BUCKETS[@]})); then   # Cloud Storage FUSE's apt repository (its install guide)
    key=/usr/share/keyrings/cloud.google.asc apt=https://packages.cloud.google.com/apt
    install+="; command -v gcsfuse >/dev/null || { echo \"deb [signed-by=$key] $apt"
    install+=' gcsfuse-$(lsb_release -c -s) main" | sudo tee /etc/apt/sources.list.d/gcsfuse.list'
    install+=" >/dev/null && curl -fsSL $apt/doc/apt-key.gpg | sudo tee $key >/dev/null"
    install+=' && sudo apt-get update -q && sudo apt-get install -y -q gcsfuse; }'
  fi
  run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command="$install"
fi

# 3. The kdjax command on every worker.
command=''
for bucket in ${BUCKETS[@]+"${BUCKETS[@]}"}; do
  mnt=$GCS_ROOT/$bucket
  command+="{ mountpoint -q $mnt || { sudo mkdir -p $mnt && sudo chown \"\$(id -u):\$(id -g)\" $mnt"
  command+=" && gcsfuse --implicit-dirs --rename-dir-limit=100000 $bucket $mnt; }; } && "
done
command+="cd $DIR && KDJAX_DISTRIBUTED_AUTO=1"
for kv in ${ENVS[@]+"${ENVS[@]}"}; do command+=" ${kv%%=*}=$(quote "${kv#*=}")"; done
((!DETACH)) || command+=' nohup'
command+=" python3 -m kdjax $(quote_all "${ARGS[@]}")"
((!DETACH)) || command+=' > kdjax.log 2>&1 < /dev/null &'
run gcloud compute tpus tpu-vm ssh "$NAME" --worker=all "${WHERE[@]}" --command="$command"
