#!/usr/bin/env bash
# Train kinetix on this machine: build the virtual environment if needed, set the
# reproducibility environment, then `exec python -m kinetix.train "$@"`.
#
# Usage:
#   launch/local.sh --config configs/paper.py [--workdir W] [--config.data.root=/data/bids] ...
#
# All arguments go to `python -m kinetix.train` unchanged. Without --workdir the run goes to
# runs/$(date +%Y%m%d-%H%M)-<config name> (relative to the current directory); pass --workdir
# to resume an earlier run (kinetix.train resumes from the latest checkpoint in it).
#
# Environment (all optional):
#   KINETIX_DETERMINISTIC=1  (default) add --xla_gpu_deterministic_ops=true to XLA_FLAGS:
#                            run-to-run identical results on GPU, but slower (see
#                            launch/README.md). 0: leave XLA_FLAGS as it is.
#   KINETIX_LOCKED=0         1: install the exact pins of requirements/<backend>.lock.txt with
#                            --require-hashes (Python 3.11), then kinetix with --no-deps.
#   KINETIX_BACKEND=auto     cpu | cuda12 | auto (cuda12 when `nvidia-smi -L` finds a GPU).
#   KINETIX_VENV=<repo>/.venv   virtual environment to create or reuse.
#   KINETIX_PYTHON=python3.11   interpreter that creates the environment.
#   KINETIX_DRY_RUN=0        1: print the environment and the command; build and run nothing.
#   KINETIX_SETUP_ONLY=0     1: build or update the environment, then exit (slurm.sbatch and
#                            cloud_vm.sh use this before starting the run).
#   KINETIX_NO_SETUP=0       1: use the environment as it is (fail if it does not exist).
#   JAX_COMPILATION_CACHE_DIR   default ${XDG_CACHE_HOME:-~/.cache}/kinetix/jax (per user).
set -euo pipefail

die() {
  echo "launch/local.sh: error: $*" >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${KINETIX_VENV:-$ROOT/.venv}"
PYTHON="${KINETIX_PYTHON:-python3.11}"
DRY_RUN="${KINETIX_DRY_RUN:-0}"
LOCKED="${KINETIX_LOCKED:-0}"
DETERMINISTIC="${KINETIX_DETERMINISTIC:-1}"

for name in DRY_RUN LOCKED DETERMINISTIC; do
  case "${!name}" in
    0 | 1) ;;
    *) die "KINETIX_$name must be 0 or 1, got '${!name}'." ;;
  esac
done

# ---------------------------------------------------------------------------- backend ---
backend="${KINETIX_BACKEND:-auto}"
if [[ "$backend" == auto ]]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    backend=cuda12
  else
    backend=cpu
  fi
fi
case "$backend" in
  cpu) extras="" ;;
  cuda12) extras="[cuda12]" ;;
  *) die "KINETIX_BACKEND must be auto, cpu or cuda12, got '$backend'." ;;
esac
LOCK="$ROOT/requirements/$backend.lock.txt"

# ------------------------------------------------------------------------ environment ---
# The install is redone when the lock mode, backend or pyproject.toml / lock file changes.
install_key() {
  local files=("$ROOT/pyproject.toml")
  [[ "$LOCKED" == 1 ]] && files+=("$LOCK")
  echo "locked=$LOCKED backend=$backend $(cat "${files[@]}" | cksum)"
}

setup_venv() {
  local stamp="$VENV/.kinetix-install"
  if [[ ! -x "$VENV/bin/python" ]]; then
    command -v "$PYTHON" >/dev/null 2>&1 ||
      die "$PYTHON not found; install Python 3.11 or set KINETIX_PYTHON."
    echo "launch/local.sh: creating $VENV with $PYTHON" >&2
    "$PYTHON" -m venv "$VENV"
  fi
  local key
  key="$(install_key)"
  if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
    return
  fi
  local pip=("$VENV/bin/python" -m pip)
  if [[ "$LOCKED" == 1 ]]; then
    [[ -f "$LOCK" ]] || die "lock file $LOCK not found."
    "$VENV/bin/python" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' ||
      die "the lock files are for Python 3.11 but $VENV has $("$VENV/bin/python" -V)."
    "${pip[@]}" install --require-hashes -r "$LOCK"
    "${pip[@]}" install --no-deps --no-build-isolation -e "$ROOT"
  else
    "${pip[@]}" install -e "$ROOT$extras"
  fi
  echo "$key" >"$stamp"
}

# -------------------------------------------------------------------- arguments ---------
# Find --config (for the default run name) and --workdir among the absl flags.
config_path=""
workdir=""
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  case "${args[i]}" in
    --config=* | -config=*) config_path="${args[i]#*=}" ;;
    --config | -config) config_path="${args[i + 1]:-}" ;;
    --workdir=* | -workdir=*) workdir="${args[i]#*=}" ;;
    --workdir | -workdir) workdir="${args[i + 1]:-}" ;;
  esac
done
if [[ -z "$workdir" && -n "$config_path" ]]; then
  name="$(basename "${config_path%%:*}" .py)"
  workdir="runs/$(date +%Y%m%d-%H%M)-$name"
  args+=(--workdir "$workdir")
fi

# --------------------------------------------------------------- reproducibility env ---
if [[ "$DETERMINISTIC" == 1 && "${XLA_FLAGS:-}" != *xla_gpu_deterministic_ops* ]]; then
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_deterministic_ops=true"
fi
export XLA_FLAGS="${XLA_FLAGS:-}"
cache_home="${XDG_CACHE_HOME:-$HOME/.cache}"
export JAX_COMPILATION_CACHE_DIR="${JAX_COMPILATION_CACHE_DIR:-$cache_home/kinetix/jax}"
# configs/*.py import each other (`from configs import default`): the repo root must be importable.
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

# ${a[@]+"${a[@]}"}: an empty array under `set -u` in bash 3.2 (macOS).
cmd=("$VENV/bin/python" -m kinetix.train ${args[@]+"${args[@]}"})

if [[ "$DRY_RUN" == 1 ]]; then
  echo "backend=$backend locked=$LOCKED venv=$VENV"
  echo "XLA_FLAGS=$XLA_FLAGS"
  echo "JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR"
  echo "PYTHONPATH=$PYTHONPATH"
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi

if [[ "${KINETIX_NO_SETUP:-0}" == 1 ]]; then
  [[ -x "$VENV/bin/python" ]] || die "KINETIX_NO_SETUP=1 but $VENV does not exist."
else
  setup_venv
fi
if [[ "${KINETIX_SETUP_ONLY:-0}" == 1 ]]; then
  echo "launch/local.sh: environment ready: $VENV (backend=$backend locked=$LOCKED)" >&2
  exit 0
fi

# Record how this run was launched (one line per launch, appended; process 0 only).
if [[ -n "$workdir" && "${SLURM_PROCID:-0}" == 0 ]]; then
  mkdir -p "$workdir"
  {
    printf '%s host=%s commit=%s backend=%s locked=%s XLA_FLAGS=%q cmd=' \
      "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$(hostname)" \
      "$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo unknown)" \
      "$backend" "$LOCKED" "$XLA_FLAGS"
    printf '%q ' "${cmd[@]}"
    echo
  } >>"$workdir/launch.log"
fi
echo "launch/local.sh: XLA_FLAGS=$XLA_FLAGS" >&2
exec "${cmd[@]}"
