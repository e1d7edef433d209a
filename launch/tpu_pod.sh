#!/usr/bin/env bash
# Train spectrax on a Cloud TPU VM slice: one process per TPU host, all started at once with
# `gcloud compute tpus tpu-vm ssh --worker=all`; each finds the others through the TPU
# metadata (spectrax.sharding.initialize_distributed -> jax.distributed.initialize()).
#
# Usage (from the repository root):
#   BUCKET=gs://my-bucket/spectrax launch/tpu_pod.sh [--dry-run] STEP [STEP...]
# Steps, in the order `up` runs them:
#   create   gcloud compute tpus tpu-vm create (ACCELERATOR_TYPE, TPU_VERSION, ZONE, SPOT)
#   install  Python >= 3.11 venv + `pip install jax[tpu] -e <checkout>` on every host
#            (INSTALL_FROM=copy: this working tree, tar + scp; INSTALL_FROM=git: REPO_URL@GIT_REF)
#   mount    Cloud Storage FUSE mount of BUCKET at MOUNT on every host (checkpoints live there)
#   data     training data on every host's local disk: DATA_URI (gs://... prepared shards) is
#            copied, otherwise the embedded simulator writes the config's data (deterministic,
#            so every host has the same bytes)
#   train    python -m spectrax.train --config=CONFIG on every host, detached, from the bucket
#            mount, so the work directory (spectrax's runs/<config>-<variant>, or WORKDIR) and
#            its checkpoints are in BUCKET (log: ~/spectrax-train.log on each host)
#   up       = create install mount data train
# Other steps: logs (follow worker 0's log), status, stop (SIGTERM: save and exit 0), watch
# (re-create the slice and resume after each preemption until training ends), delete.
#
# Preemption: a preempted Spot/preemptible TPU VM sends SIGTERM to the training processes,
# which finish their step, save a checkpoint and exit 0 (spectrax.train). The VM then sits in
# PREEMPTED state and must be deleted and created again; `delete up` (or `watch`) does that, and
# train resumes from the newest complete checkpoint in BUCKET/runs/<run>/checkpoints.
#
# All settings are environment variables (defaults below); --dry-run (or DRY_RUN=1) prints
# every command instead of running it.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/.." && pwd)"

usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; }

STEPS=()
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY_RUN=1 ;;
    -h|--help) usage; exit 0 ;;
    -*) echo "tpu_pod.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) STEPS+=("$arg") ;;
  esac
done
export DRY_RUN="${DRY_RUN:-0}"
if [[ ${#STEPS[@]} -eq 0 ]]; then usage >&2; exit 2; fi

# shellcheck source=launch/env.sh
source "$HERE/env.sh"

# -- settings --------------------------------------------------------------------------------
TPU_NAME="${TPU_NAME:-spectrax-pod}"
ZONE="${ZONE:-us-central2-b}"
ACCELERATOR_TYPE="${ACCELERATOR_TYPE:-v4-32}"        # v4-32: 4 hosts x 4 chips
TPU_VERSION="${TPU_VERSION:-tpu-ubuntu2204-base}"    # TPU VM software image
PROJECT="${PROJECT:-}"                              # empty: gcloud's configured project
SPOT="${SPOT:-0}"                                   # 1: --spot (preemptible, cheaper)
BUCKET="${BUCKET:-gs://YOUR-BUCKET/spectrax}"       # checkpoints + compile cache live here
MOUNT="${MOUNT:-/mnt/spectrax}"                     # where every host mounts BUCKET
INSTALL_FROM="${INSTALL_FROM:-copy}"                # copy | git
REPO_URL="${REPO_URL:-}"                            # for INSTALL_FROM=git
GIT_REF="${GIT_REF:-main}"
REMOTE_DIR="${REMOTE_DIR:-spectrax}"                # checkout on each host, under $HOME
VENV="${VENV:-spectrax-venv}"                       # virtual environment, under $HOME
PYTHON="${PYTHON:-python3.11}"                      # spectrax needs Python >= 3.11
JAX_PIP_SPEC="${JAX_PIP_SPEC:-jax[tpu]}"
DATA_URI="${DATA_URI:-}"                            # gs://.../shards, or empty = simulator
WATCH_SECONDS="${WATCH_SECONDS:-300}"
COORDINATOR_PORT="${COORDINATOR_PORT:-8482}"        # jax.distributed coordinator on worker 0

BUCKET_NAME="${BUCKET#gs://}"; BUCKET_NAME="${BUCKET_NAME%%/*}"
BUCKET_PREFIX="${BUCKET#gs://"$BUCKET_NAME"}"; BUCKET_PREFIX="${BUCKET_PREFIX#/}"
BUCKET_PREFIX="${BUCKET_PREFIX%/}"
REMOTE_LOG="spectrax-train.log"                     # under $HOME on every host
REMOTE_PID="spectrax-train.pid"

if [[ "$BUCKET" != gs://* ]]; then
  echo "tpu_pod.sh: BUCKET must be gs://NAME[/PREFIX], got '$BUCKET'" >&2; exit 2
fi
if [[ "$DRY_RUN" != 1 && "$BUCKET_NAME" == YOUR-BUCKET && " ${STEPS[*]} " =~ \ (mount|up|watch)\  ]]
then
  echo "tpu_pod.sh: set BUCKET=gs://<your bucket>[/prefix] (checkpoints go there)" >&2; exit 2
fi

gc() { spectrax_run gcloud "$@" ${PROJECT:+"--project=$PROJECT"}; }
# on_workers WORKER COMMAND: runs a shell command on TPU host(s) WORKER (0, 1, ... or all).
on_workers() {
  gc compute tpus tpu-vm ssh "$TPU_NAME" "--zone=$ZONE" "--worker=$1" "--command=$2"
}
q() { printf '%q' "$1"; }

# -- steps -----------------------------------------------------------------------------------
step_create() {
  local args=(compute tpus tpu-vm create "$TPU_NAME" "--zone=$ZONE"
              "--accelerator-type=$ACCELERATOR_TYPE" "--version=$TPU_VERSION")
  [[ "$SPOT" == 1 ]] && args+=(--spot)
  gc "${args[@]}"
}

step_install() {
  local fetch
  if [[ "$INSTALL_FROM" == copy ]]; then
    local tarball="${TMPDIR:-/tmp}/spectrax-src-$$.tgz"
    # The working tree as it is (uncommitted edits included), without data, runs and caches.
    spectrax_run tar -czf "$tarball" -C "$REPO" --exclude=./data --exclude=./runs \
      --exclude=./.git --exclude='*.egg-info' --exclude=__pycache__ .
    gc compute tpus tpu-vm scp "$tarball" "$TPU_NAME:spectrax-src.tgz" "--zone=$ZONE" \
      --worker=all
    spectrax_run rm -f "$tarball"
    fetch="rm -rf ~/$(q "$REMOTE_DIR") && mkdir -p ~/$(q "$REMOTE_DIR") && tar -xzf ~/spectrax-src.tgz -C ~/$(q "$REMOTE_DIR")"
  elif [[ "$INSTALL_FROM" == git ]]; then
    [[ -n "$REPO_URL" || "$DRY_RUN" == 1 ]] || { echo "INSTALL_FROM=git needs REPO_URL" >&2; exit 2; }
    fetch="rm -rf ~/$(q "$REMOTE_DIR") && git clone --depth 1 --branch $(q "$GIT_REF") $(q "${REPO_URL:-REPO_URL}") ~/$(q "$REMOTE_DIR")"
  else
    echo "tpu_pod.sh: INSTALL_FROM must be copy or git, got '$INSTALL_FROM'" >&2; exit 2
  fi
  # The stock TPU VM image has Python 3.10; spectrax needs >= 3.11 (PYTHON, from apt here).
  on_workers all "set -e
sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(q "$PYTHON") $(q "$PYTHON-venv")
$fetch
$(q "$PYTHON") -m venv ~/$(q "$VENV")
~/$(q "$VENV")/bin/pip install -q -U pip
~/$(q "$VENV")/bin/pip install -q -U $(q "$JAX_PIP_SPEC") -e ~/$(q "$REMOTE_DIR")
~/$(q "$VENV")/bin/python -c 'import jax, spectrax; print(jax.__version__, jax.device_count(), \"devices\")'"
}

step_mount() {
  # Cloud Storage FUSE: the bucket prefix appears as a local directory on every host, so
  # Orbax's multi-host save (each process writes its own shards, process 0 commits) works on
  # it as on any shared file system. rename-dir-limit lets Orbax rename its temporary step
  # directory (atomic on buckets with hierarchical namespace, copy+delete on flat ones: there
  # spectrax's restore skips a step directory that is not complete); metadata TTL 0 so every
  # host sees files the others have just written.
  on_workers all "set -e
if ! command -v gcsfuse >/dev/null; then
  echo \"deb [signed-by=/usr/share/keyrings/cloud.google.asc] https://packages.cloud.google.com/apt gcsfuse-\$(lsb_release -c -s) main\" | sudo tee /etc/apt/sources.list.d/gcsfuse.list >/dev/null
  curl -fsSL https://packages.cloud.google.com/apt/doc/apt-key.gpg | sudo tee /usr/share/keyrings/cloud.google.asc >/dev/null
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq gcsfuse
fi
cat > ~/spectrax-gcsfuse.yaml <<'YAML'
implicit-dirs: true
only-dir: \"$BUCKET_PREFIX\"
file-system:
  rename-dir-limit: 200000
metadata-cache:
  ttl-secs: 0
YAML
sudo mkdir -p $(q "$MOUNT") && sudo chown \"\$(id -u):\$(id -g)\" $(q "$MOUNT")
mountpoint -q $(q "$MOUNT") || gcsfuse --config-file ~/spectrax-gcsfuse.yaml $(q "$BUCKET_NAME") $(q "$MOUNT")
mkdir -p $(q "$MOUNT/runs") $(q "$MOUNT/jax-cache")"
}

step_data() {
  if [[ -n "$DATA_URI" ]]; then
    # Prepared shards (python -m spectrax.prepare ...) copied to local disk on every host;
    # train is then pointed at them with --config.data.path.
    on_workers all "set -e; mkdir -p ~/$(q "$REMOTE_DIR")/data/remote
gcloud storage rsync --recursive $(q "$DATA_URI") ~/$(q "$REMOTE_DIR")/data/remote"
  else
    # The simulator on every host, on the CPU (JAX_PLATFORMS=cpu: this single process must not
    # claim the TPU the training processes need). Same config -> same bytes on every host.
    on_workers all "set -e; cd ~/$(q "$REMOTE_DIR")
JAX_PLATFORMS=cpu ~/$(q "$VENV")/bin/python - $(q "$CONFIG") <<'PY'
import sys
from pathlib import Path
from spectrax.prepare import ensure_data
path, _, arg = sys.argv[1].partition(':')
ns = {}
exec(compile(Path(path).read_text(), path, 'exec'), ns)
print('data ready:', ensure_data(ns['get_config'](arg or None).data))
PY"
  fi
}

train_command() {
  # Run from the bucket mount: relative paths in the config (runs/..., a redshift config's
  # init.from_workdir) resolve inside the bucket; the config file and the data cache stay in
  # the local checkout ($R).
  local cmd w
  cmd="\"\$HOME\"/$(spectrax_quote "$VENV/bin/python") -m spectrax.train"
  cmd+=" --config=\"\$R\"/$(spectrax_quote "$CONFIG") --config.data.cache_dir=\"\$R\"/data"
  if [[ -n "$DATA_URI" ]]; then
    cmd+=" --config.data.path=\"\$R\"/data/remote"
  fi
  while IFS= read -r w; do
    cmd+=" $(spectrax_quote "$w")"
  done < <(spectrax_train_args | tail -n +2)     # the flags after --config
  printf '%s' "$cmd"
}

step_train() {
  # spectrax.sharding.initialize_distributed() calls jax.distributed.initialize() when the
  # environment names a coordinator; a TPU VM made by `tpu-vm create` does not export one (its
  # worker list is in the GCE metadata), so worker 0's address is read from there and exported
  # as JAX_COORDINATOR_ADDRESS; JAX then takes the process count and index from the metadata.
  # Detached (setsid + nohup), so the run survives the end of this ssh session; the PID is kept
  # for `stop`. The compilation cache sits in the bucket, so a restarted run compiles nothing.
  on_workers all "set -e; cd ~/$(q "$REMOTE_DIR"); source launch/env.sh; R=\$PWD
md=http://metadata.google.internal/computeMetadata/v1/instance/attributes
first=\$(curl -sf -H 'Metadata-Flavor: Google' \$md/worker-network-endpoints | cut -d, -f1)
case \$first in *:*:*) first=\$(echo \$first | cut -d: -f3) ;; esac
export JAX_COORDINATOR_ADDRESS=\$first:$(q "$COORDINATOR_PORT")
export JAX_COMPILATION_CACHE_DIR=$(q "$MOUNT/jax-cache")
cd $(q "$MOUNT")
setsid nohup $(train_command) > ~/$REMOTE_LOG 2>&1 < /dev/null &
echo \$! > ~/$REMOTE_PID
echo \"\$(hostname): training (pid \$(cat ~/$REMOTE_PID)), log ~/$REMOTE_LOG, run directory $BUCKET/runs\""
}

step_logs() { on_workers 0 "tail -n 100 -f ~/$REMOTE_LOG"; }

step_status() {
  gc compute tpus tpu-vm describe "$TPU_NAME" "--zone=$ZONE" "--format=value(state)"
}

step_stop() {
  # SIGTERM: every process finishes its step, saves a checkpoint and exits 0.
  on_workers all "test -f ~/$REMOTE_PID && kill -TERM \$(cat ~/$REMOTE_PID) || true"
}

step_delete() { gc compute tpus tpu-vm delete "$TPU_NAME" "--zone=$ZONE" --quiet; }

step_up() { step_create; step_install; step_mount; step_data; step_train; }

step_watch() {
  # Poll every WATCH_SECONDS: a preempted (or vanished) slice is deleted, re-created and
  # training restarted, which resumes from the last checkpoint; a READY slice whose worker-0
  # training process has exited means the run ended (finished or failed): show its log, stop.
  local state
  while true; do
    if [[ "$DRY_RUN" == 1 ]]; then
      step_status
      echo "# if the state is PREEMPTED, TERMINATED or the slice is gone:"
      step_delete; step_up
      echo "# if READY: is training still running on worker 0?"
      on_workers 0 "kill -0 \$(cat ~/$REMOTE_PID) 2>/dev/null"
      return 0
    fi
    state="$(step_status 2>/dev/null || true)"
    case "$state" in
      PREEMPTED|TERMINATED|STOPPED|"")
        echo "$(date -u +%FT%TZ) slice '${TPU_NAME}' state '${state:-gone}': re-creating, resuming"
        if [[ -n "$state" ]]; then step_delete; fi
        step_up ;;
      READY)
        if ! on_workers 0 "kill -0 \$(cat ~/$REMOTE_PID) 2>/dev/null" >/dev/null 2>&1; then
          echo "$(date -u +%FT%TZ) training on worker 0 has exited; last lines of its log:"
          on_workers 0 "tail -n 30 ~/$REMOTE_LOG" || true
          return 0
        fi ;;
      *) ;;   # CREATING, RESTARTING, ...: wait
    esac
    sleep "$WATCH_SECONDS"
  done
}

for s in "${STEPS[@]}"; do
  case "$s" in
    create|install|mount|data|train|logs|status|stop|delete|up|watch) "step_$s" ;;
    *) echo "tpu_pod.sh: unknown step '$s' (see --help)" >&2; exit 2 ;;
  esac
done
