#!/usr/bin/env bash
# Runs clip_jax on a Cloud TPU VM or pod slice: create, install, train on every host, logs, delete.
#
#   launch/tpu_vm.sh up --name clip-l14 --zone us-central2-b --accelerator v4-256 \
#       --workdir gs://my-bucket/runs/l14 -- --config=configs/vitl14.py \
#       --config.data.path='gs://my-bucket/laion/{00000..41407}.tar'
#   launch/tpu_vm.sh logs   --name clip-l14 --zone us-central2-b
#   launch/tpu_vm.sh stop   --name clip-l14 --zone us-central2-b   # SIGTERM: save, exit
#   launch/tpu_vm.sh delete --name clip-l14 --zone us-central2-b
#
# Commands: create | setup | train | logs | stop | delete | up (= create, setup, train, logs).
# create/up first compile the train step for the slice here (the TPU preflight, needs libtpu:
# pip install 'clip_jax[tpu]') and stop when it does not fit; --skip-preflight goes on anyway.
# --dry-run prints every command (gcloud and local) without running any. See launch/README.md.
set -euo pipefail

# Paths on the workers, expanded by the remote shell (not here).
# shellcheck disable=SC2088
readonly REMOTE_DIR='~/clip_jax' REMOTE_LOGS='~/clip_jax_logs' REMOTE_JOB='~/clip_jax_train.sh'
SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
readonly SCRIPT_DIR

usage() {
  cat <<'EOF'
usage: launch/tpu_vm.sh COMMAND --name NAME --zone ZONE [options] [-- TRAIN_ARGS...]

commands:
  create   create the TPU VM / pod slice (--queued: through a queued resource); with
           TRAIN_ARGS, first the TPU preflight: `python -m clip_jax.train --dry_run
           --topology=ACCELERATOR TRAIN_ARGS` compiles the step for the slice on this
           machine and nothing is created when it does not fit
  setup    copy this checkout (git HEAD) to every worker and pip install it with jax[tpu]
           (--pillow-simd: then Pillow-SIMD in place of Pillow, launch/install_pillow_simd.sh)
  train    start `python -m clip_jax.train --workdir=WORKDIR TRAIN_ARGS` on every worker
           (detached; survives ssh disconnects), then follow the logs (--no-follow: don't)
  logs     follow the training log of worker 0 (--log-worker=all: of every worker),
           saved to LOG_DIR/NAME.log
  stop     SIGTERM the training on every worker (the trainer saves the current step)
  delete   delete the TPU VM (or the queued resource and its TPU)
  up       create (after the preflight), setup, train

options:
  --name NAME            TPU name (required)
  --zone ZONE            e.g. us-central2-b (required)
  --project PROJECT      GCP project (default: gcloud's configured project)
  --accelerator TYPE     e.g. v4-8, v4-256, v5litepod-64, v5p-128, v6e-256 (default v4-8)
  --version VERSION      TPU runtime (default: chosen from the accelerator generation)
  --queued               create through `queued-resources create` (waits for capacity)
  --spot                 spot capacity (preemptible; the trainer saves on SIGTERM)
  --workdir gs://...     run directory on GCS, shared by all hosts (required for train)
  --source DIR           checkout to install (default: this repository)
  --log-dir DIR          local log directory (default: logs/tpu)
  --log-worker W         worker(s) whose log to follow: 0 (default) or all
  --no-follow            train: start and return without following the logs
  --pillow-simd          setup: build Pillow-SIMD on every worker (~5x faster image resize
                         in the input pipeline; apt-get installs the libjpeg/zlib headers)
  --skip-preflight       create even when the preflight fails (no libtpu here, or a step
                         that does not fit)
  --dry-run              print every command instead of running it
environment:
  PYTHON                 the local python running the preflight (default python3)
EOF
}

die() { echo "error: $*" >&2; exit 2; }

# Prints a command as copy-pasteable shell, then runs it unless --dry-run.
quote() {
  local out=() arg
  for arg in "$@"; do
    if [[ $arg =~ ^[A-Za-z0-9_./:=@,+%-]+$ ]]; then out+=("$arg"); else out+=("${arg@Q}"); fi
  done
  echo "${out[*]}"
}
run() {
  echo "+ $(quote "$@")"
  if [[ $DRY_RUN == 0 ]]; then "$@"; fi
}

# TPU runtime image for an accelerator generation.
default_version() {
  case "$1" in
    v5litepod-*|v5e-*) echo "v2-alpha-tpuv5-lite" ;;
    v5p-*) echo "v2-alpha-tpuv5" ;;
    v6e-*) echo "v2-alpha-tpuv6e" ;;
    v2-*|v3-*|v4-*) echo "tpu-ubuntu2204-base" ;;
    *) die "--accelerator=$1 is not a known TPU type (e.g. v4-8, v4-256, v5litepod-64, v5p-128, v6e-256)" ;;
  esac
}

# Hosts (= JAX processes) of a slice: v2/v3/v4/v5p count TensorCores (8 per host on v2/v3,
# 4 chips x 2 cores on v4/v5p), v5e/v6e count chips (4 per host on multi-host slices).
num_hosts() {
  local type=$1 size=${1##*-}
  [[ $size =~ ^[0-9]+$ ]] || die "--accelerator=$type has no size (e.g. v4-256)"
  case "$type" in
    v2-*|v3-*|v4-*|v5p-*) echo $(( size <= 8 ? 1 : size / 8 )) ;;
    v5litepod-*|v5e-*|v6e-*) echo $(( size <= 8 ? 1 : size / 4 )) ;;
    *) die "--accelerator=$type is not a known TPU type" ;;
  esac
}

COMMAND=${1:-}
[[ -n $COMMAND ]] || { usage; exit 2; }
shift
case "$COMMAND" in
  create|setup|train|logs|stop|delete|up) ;;
  -h|--help|help) usage; exit 0 ;;
  *) usage >&2; die "unknown command '$COMMAND'" ;;
esac

NAME="" ZONE="" PROJECT="" ACCELERATOR="v4-8" VERSION="" QUEUED=0 SPOT=0 WORKDIR=""
SOURCE="$(dirname "$SCRIPT_DIR")" LOG_DIR="logs/tpu" LOG_WORKER="0" FOLLOW=1 DRY_RUN=0
PREFLIGHT=1 PILLOW_SIMD=0
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) NAME=${2:?--name needs a value}; shift 2 ;;
    --zone) ZONE=${2:?--zone needs a value}; shift 2 ;;
    --project) PROJECT=${2:?--project needs a value}; shift 2 ;;
    --accelerator) ACCELERATOR=${2:?--accelerator needs a value}; shift 2 ;;
    --version) VERSION=${2:?--version needs a value}; shift 2 ;;
    --workdir) WORKDIR=${2:?--workdir needs a value}; shift 2 ;;
    --source) SOURCE=${2:?--source needs a value}; shift 2 ;;
    --log-dir) LOG_DIR=${2:?--log-dir needs a value}; shift 2 ;;
    --log-worker) LOG_WORKER=${2:?--log-worker needs a value}; shift 2 ;;
    --queued) QUEUED=1; shift ;;
    --spot) SPOT=1; shift ;;
    --no-follow) FOLLOW=0; shift ;;
    --skip-preflight) PREFLIGHT=0; shift ;;
    --pillow-simd) PILLOW_SIMD=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h|--help) usage; exit 0 ;;
    --) shift; TRAIN_ARGS=("$@"); break ;;
    *) die "unknown option '$1' (training arguments go after '--')" ;;
  esac
done

[[ -n $NAME ]] || die "--name NAME is required"
[[ -n $ZONE ]] || die "--zone ZONE is required"
[[ -n $VERSION ]] || VERSION=$(default_version "$ACCELERATOR")
HOSTS=$(num_hosts "$ACCELERATOR")
[[ $LOG_WORKER == all || $LOG_WORKER =~ ^[0-9]+$ ]] || die "--log-worker=$LOG_WORKER: use a worker number or all"

GCLOUD_FLAGS=(--zone="$ZONE")
[[ -z $PROJECT ]] || GCLOUD_FLAGS+=(--project="$PROJECT")

ssh_all() {  # ssh_all WORKER REMOTE_COMMAND
  run gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$1" --command="$2"
}

# The TPU preflight: compiles the real train step for this slice on this machine (CPU; libtpu
# only compiles) and prints the trainer's dry-run JSON line with "fits". Exit 4: it does not
# fit; 2: a user error (no libtpu, a mesh the slice cannot hold). Nothing is created then.
do_preflight() {
  if [[ ${#TRAIN_ARGS[@]} -eq 0 ]]; then
    echo "# no training flags after '--': no preflight"
    return 0
  fi
  local cmd=("${PYTHON:-python3}" -m clip_jax.train --dry_run --topology="$ACCELERATOR")
  cmd+=("${TRAIN_ARGS[@]}")
  if [[ $PREFLIGHT == 0 ]]; then
    echo "# preflight skipped (--skip-preflight): $(quote "${cmd[@]}")"
    return 0
  fi
  echo "# preflight: compile the train step for $ACCELERATOR here before creating it"
  echo "+ (cd $(quote "$SOURCE") && $(quote "${cmd[@]}"))"
  [[ $DRY_RUN == 0 ]] || return 0
  local code=0
  (cd "$SOURCE" && "${cmd[@]}") || code=$?
  if [[ $code != 0 ]]; then
    echo "error: the preflight for $ACCELERATOR failed (exit $code, line above); nothing was" \
      "created. Fix the config (python -m clip_jax.train --dry_run --topology=$ACCELERATOR" \
      "--fit proposes overrides) or pass --skip-preflight" >&2
    exit "$code"
  fi
}

do_create() {
  do_preflight
  echo "# $ACCELERATOR: $HOSTS host(s), one JAX process each; runtime $VERSION"
  local capacity=()
  [[ $SPOT == 0 ]] || capacity=(--spot)
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --node-id="$NAME" --accelerator-type="$ACCELERATOR" --runtime-version="$VERSION" \
      "${capacity[@]}"
    echo "# waiting for the queued resource to become ACTIVE"
    if [[ $DRY_RUN == 0 ]]; then
      local state=""
      until [[ $state == ACTIVE ]]; do
        state=$(gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" \
          --format='value(state.state)')
        case "$state" in
          FAILED|SUSPENDED) die "queued resource $NAME is $state" ;;
          ACTIVE) ;;
          *) echo "# $NAME: ${state:-unknown}"; sleep 60 ;;
        esac
      done
    else
      echo "+ $(quote gcloud compute tpus queued-resources describe "$NAME" "${GCLOUD_FLAGS[@]}" \
        --format='value(state.state)')  # until ACTIVE"
    fi
  else
    run gcloud compute tpus tpu-vm create "$NAME" "${GCLOUD_FLAGS[@]}" \
      --accelerator-type="$ACCELERATOR" --version="$VERSION" "${capacity[@]}"
  fi
}

do_setup() {
  local archive
  archive="${TMPDIR:-/tmp}/clip_jax-$NAME.tar.gz"
  # The committed tree (git HEAD), identical on every host; the config hash check relies on it.
  # gcsfs: gs:// paths for etils.epath (Orbax checkpoints, data, metrics.jsonl);
  # google-cloud-storage: tensorboardX's gs:// event writer.
  run git -C "$SOURCE" archive --format=tar.gz -o "$archive" HEAD
  run gcloud compute tpus tpu-vm scp "$archive" "$NAME:clip_jax.tar.gz" "${GCLOUD_FLAGS[@]}" \
    --worker=all
  ssh_all all "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR $REMOTE_LOGS \
&& tar xzf ~/clip_jax.tar.gz -C $REMOTE_DIR \
&& python3 -m pip install -q -U 'jax[tpu]' gcsfs google-cloud-storage && python3 -m pip install -q -e $REMOTE_DIR"
  if [[ $PILLOW_SIMD == 1 ]]; then
    # After the install above, which pulls Pillow in: Pillow-SIMD replaces it (same PIL API).
    ssh_all all "sudo apt-get update -q && sudo apt-get install -y -q build-essential libjpeg-turbo8-dev zlib1g-dev libwebp-dev \
&& bash $REMOTE_DIR/launch/install_pillow_simd.sh"
  fi
}

do_train() {
  [[ -n $WORKDIR ]] || die "--workdir gs://BUCKET/PATH is required (shared by all hosts)"
  [[ $WORKDIR == gs://* ]] || echo "# warning: --workdir=$WORKDIR is not on GCS; every host needs the same shared directory" >&2
  [[ ${#TRAIN_ARGS[@]} -gt 0 ]] || die "give the training flags after '--', e.g. -- --config=configs/vitl14.py"
  # The job script every worker runs: the trainer, then its log copied next to the checkpoints.
  local script job
  script="${TMPDIR:-/tmp}/clip_jax-$NAME-train.sh"
  job=$(cat <<EOF
#!/usr/bin/env bash
# clip_jax training job on $NAME (written by launch/tpu_vm.sh)
cd $REMOTE_DIR || exit 1
$(quote python3 -m clip_jax.train --workdir="$WORKDIR" "${TRAIN_ARGS[@]}") > $REMOTE_LOGS/train.log 2>&1
code=\$?
echo "exit code \$code" >> $REMOTE_LOGS/train.log
gcloud storage cp $REMOTE_LOGS/train.log $(quote "$WORKDIR")/logs/\$(hostname).log
exit \$code
EOF
)
  echo "# $script:"
  local line
  while IFS= read -r line; do echo "#   $line"; done <<< "$job"
  [[ $DRY_RUN == 1 ]] || printf '%s\n' "$job" > "$script"
  run gcloud compute tpus tpu-vm scp "$script" "$NAME:clip_jax_train.sh" "${GCLOUD_FLAGS[@]}" \
    --worker=all
  # Detached in its own session: an ssh disconnect does not stop it; `stop` signals the group.
  ssh_all all "mkdir -p $REMOTE_LOGS && nohup setsid bash $REMOTE_JOB > /dev/null 2>&1 \
< /dev/null & echo \$! > $REMOTE_LOGS/train.pid"
  if [[ $FOLLOW == 1 ]]; then do_logs; fi
}

do_logs() {
  local log="$LOG_DIR/$NAME.log"
  echo "+ mkdir -p $(quote "$LOG_DIR")"
  [[ $DRY_RUN == 1 ]] || mkdir -p "$LOG_DIR"
  echo "# following worker $LOG_WORKER (Ctrl-C stops following, not training); saved to $log"
  local tail_cmd="tail -n +1 -F $REMOTE_LOGS/train.log"
  echo "+ $(quote gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" \
    --worker="$LOG_WORKER" --command="$tail_cmd") | tee -a $(quote "$log")"
  if [[ $DRY_RUN == 0 ]]; then
    gcloud compute tpus tpu-vm ssh "$NAME" "${GCLOUD_FLAGS[@]}" --worker="$LOG_WORKER" \
      --command="$tail_cmd" 2>&1 | tee -a "$log"
  fi
}

do_stop() {
  # SIGTERM to the job's process group: the trainer saves the current step and exits 0.
  ssh_all all "test -f $REMOTE_LOGS/train.pid && kill -TERM -- -\$(cat $REMOTE_LOGS/train.pid) || true"
}

do_delete() {
  if [[ $QUEUED == 1 ]]; then
    run gcloud compute tpus queued-resources delete "$NAME" "${GCLOUD_FLAGS[@]}" --force --quiet
  else
    run gcloud compute tpus tpu-vm delete "$NAME" "${GCLOUD_FLAGS[@]}" --quiet
  fi
}

case "$COMMAND" in
  create) do_create ;;
  setup) do_setup ;;
  train) do_train ;;
  logs) do_logs ;;
  stop) do_stop ;;
  delete) do_delete ;;
  up) do_create; do_setup; do_train ;;
esac
