# shellcheck shell=bash
# Shared environment of spectrax launches. Sourced by launch/tpu_pod.sh (locally, and on every
# TPU host before training) and by launch/slurm_gpu.sbatch (on the batch node; srun passes the
# environment on to every task). Every value is a default: export a variable before sourcing
# to override it. Sourcing changes no shell option of the caller.

# -- what to train ---------------------------------------------------------------------------
export CONFIG="${CONFIG:-configs/specpt_bgs.py}"   # configs/X.py[:variant=V], repo-relative
# Work directory; empty = spectrax's default, runs/<config name>-<variant>, under the launch's
# run root (the bucket mount on TPU, RUN_ROOT under SLURM). The SpecPT redshift configs find
# their autoencoder through that default (init.from_workdir = runs/specpt_<sample>-<variant>),
# so both stages of a two-stage run land next to each other without further flags.
export WORKDIR="${WORKDIR:-}"
# Extra overrides, split on whitespace: "--config.batch_size=256 --config.num_steps=20000".
export EXTRA_ARGS="${EXTRA_ARGS:-}"

# -- process / runtime -----------------------------------------------------------------------
export PYTHONUNBUFFERED=1                                  # logs appear as they are written
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-1}"   # XLA's C++ INFO chatter off
# GPU: let XLA take 90 % of each GPU up front (its default is 75 %).
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}"
export NCCL_DEBUG="${NCCL_DEBUG:-WARN}"
# Each launcher points JAX_COMPILATION_CACHE_DIR (jax's persistent compilation cache) at shared
# storage, so a job restarted after a preemption does not compile again.

# -- helpers ---------------------------------------------------------------------------------
# spectrax_quote WORD: WORD as a shell word (single-quoted unless it is plainly safe), keeping
# newlines readable, so a printed command can be pasted back into a shell.
spectrax_quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# spectrax_run CMD ARGS...: runs the command, or with DRY_RUN=1 prints it and returns 0.
spectrax_run() {
  if [[ "${DRY_RUN:-0}" == 1 ]]; then
    local word line="+"
    for word in "$@"; do
      line+=" $(spectrax_quote "$word")"
    done
    printf '%s\n' "$line"
  else
    "$@"
  fi
}

# spectrax_train_args: the training flags after `python -m spectrax.train` (one per line):
# --config=<CONFIG_PREFIX><CONFIG> [--workdir=WORKDIR] [EXTRA_ARGS...]. CONFIG_PREFIX lets a
# launcher that runs from another directory make the config path absolute.
spectrax_train_args() {
  printf '%s\n' "--config=${CONFIG_PREFIX:-}${CONFIG}"
  if [[ -n "$WORKDIR" ]]; then
    printf '%s\n' "--workdir=${WORKDIR}"
  fi
  local extra
  for extra in ${EXTRA_ARGS}; do
    printf '%s\n' "$extra"
  done
}
