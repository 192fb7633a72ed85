#!/usr/bin/env bash
# Train kinetix on a GPU machine reachable over SSH (a cloud VM or a workstation), inside tmux.
#
# Usage:
#   HOST=user@host WORKDIR=runs/paper CONFIG=configs/paper.py \
#       launch/cloud_vm.sh start [--shutdown] [-- --config.data.root=/data/bids ...]
#   HOST=user@host WORKDIR=runs/paper launch/cloud_vm.sh sync [--wait]
#   HOST=user@host WORKDIR=runs/paper launch/cloud_vm.sh attach
#   HOST=user@host WORKDIR=runs/paper launch/cloud_vm.sh status
#
#   start     rsync this repository to REMOTE_DIR on HOST (without .venv, runs/ and caches),
#             build the environment there (launch/local.sh: .venv, jax[cuda12] when the host has
#             a GPU), and start `launch/local.sh --config CONFIG --workdir WORKDIR ...` in the
#             detached tmux session "kinetix". Output goes to WORKDIR/train.log, the exit code
#             to WORKDIR/exit_code. Arguments after `--` go to kinetix.train.
#             --shutdown: power the host off (`shutdown -h`, as root or with passwordless
#             sudo) SHUTDOWN_DELAY_MIN minutes after the run ends, whatever its exit code.
#             Keep SHUTDOWN_DELAY_MIN above SYNC_EVERY_S / 60 so that `sync --wait` gets the
#             end of the run (a powered-off VM usually keeps its disk: start it and sync).
#   sync      rsync WORKDIR from the host to LOCAL_WORKDIR. --wait: repeat every SYNC_EVERY_S
#             seconds until WORKDIR/exit_code (written last, when the run ends) has arrived.
#   attach    attach to the tmux session (detach again with Ctrl-b d).
#   status    running or finished (with its exit code), the last log lines, GPU use.
#
# Environment: HOST (user@host, required), WORKDIR (run directory on the host, relative to
# REMOTE_DIR or absolute; required), CONFIG (start only), REMOTE_DIR (default: kinetix, under the
# remote home), LOCAL_WORKDIR (default: runs/<basename of WORKDIR> in this repository),
# SSH_OPTS (extra ssh options, e.g. "-i ~/.ssh/id_ed25519 -p 2222"), SHUTDOWN_DELAY_MIN (10),
# SYNC_EVERY_S (300), KINETIX_LOCKED, KINETIX_DETERMINISTIC, KINETIX_BACKEND (passed to
# launch/local.sh on the host), KINETIX_RSYNC_GIT=1 (default; 0 leaves .git out of the copy,
# and the run then records commit=unknown).
# The host needs bash, rsync, tmux and python3.11 (or KINETIX_PYTHON); the data must already be
# on it. Nothing here holds credentials: ssh uses your own keys and configuration.
set -euo pipefail

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

case "${1:-}" in
  start | sync | attach | status) ;;
  -h | --help | help) usage; exit 0 ;;
  "") usage >&2; exit 2 ;;
  *)
    echo "launch/cloud_vm.sh: error: unknown subcommand '$1' (start, sync, attach or status)." >&2
    exit 2
    ;;
esac
: "${HOST:?set HOST to the SSH destination, e.g. HOST=user@gpu-host}"
: "${WORKDIR:?set WORKDIR to the run directory on the host, e.g. WORKDIR=runs/paper}"

die() {
  echo "launch/cloud_vm.sh: error: $*" >&2
  exit 2
}

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REMOTE_DIR="${REMOTE_DIR:-kinetix}"
LOCAL_WORKDIR="${LOCAL_WORKDIR:-$ROOT/runs/$(basename "$WORKDIR")}"
SESSION=kinetix
read -r -a ssh_opts <<<"${SSH_OPTS:-}"
DRY_RUN="${KINETIX_DRY_RUN:-0}"

# Run a command (or print it when KINETIX_DRY_RUN=1).
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%q ' "$@"
    echo
  else
    "$@"
  fi
}

# Run a bash script (stdin) on the host with the given positional arguments.
remote() {
  local args
  args="$(printf '%q ' "$@")"
  run ssh ${ssh_opts[@]+"${ssh_opts[@]}"} "$HOST" "bash -s -- $args"
  if [[ "$DRY_RUN" == 1 ]]; then
    sed 's/^/  | /'
  fi
}

need_rsync() {
  if [[ "$DRY_RUN" != 1 ]] && ! command -v rsync >/dev/null 2>&1; then
    die "rsync is not installed on this machine."
  fi
}

rsync_ssh() {
  printf 'ssh'
  local opt
  for opt in ${ssh_opts[@]+"${ssh_opts[@]}"}; do
    printf ' %q' "$opt"
  done
}

cmd_start() {
  local shutdown=0
  while (($#)); do
    case "$1" in
      --shutdown) shutdown=1 ;;
      --) shift; break ;;
      *) die "unknown start option '$1' (kinetix.train arguments go after '--')." ;;
    esac
    shift
  done
  : "${CONFIG:?set CONFIG to a config file, e.g. CONFIG=configs/paper.py}"
  [[ -f "$ROOT/$CONFIG" ]] ||
    die "CONFIG=$CONFIG not found under $ROOT (give it relative to the repository root)."
  need_rsync

  local delay="${SHUTDOWN_DELAY_MIN:-10}"
  [[ "$delay" =~ ^[0-9]+$ ]] ||
    die "SHUTDOWN_DELAY_MIN must be a whole number of minutes, got '$delay'."

  # 1. Check the host before copying anything.
  remote "$REMOTE_DIR" "$shutdown" <<'EOF'
set -euo pipefail
for tool in rsync tmux; do
  if ! command -v "$tool" >/dev/null; then
    echo "error: $tool is not installed on $(hostname)." >&2
    exit 2
  fi
done
if tmux has-session -t kinetix 2>/dev/null; then
  echo "error: tmux session 'kinetix' is already running on $(hostname); use attach or status." >&2
  exit 2
fi
if [[ "$2" == 1 && "$(id -u)" != 0 ]] && ! sudo -n true 2>/dev/null; then
  echo "error: --shutdown needs root or passwordless sudo on $(hostname)." >&2
  exit 2
fi
mkdir -p "$1"
EOF

  # 2. Copy the repository.
  local excludes=(--exclude .venv/ --exclude runs/ --exclude __pycache__/ --exclude .pytest_cache/
    --exclude .ruff_cache/ --exclude '*.egg-info/')
  [[ "${KINETIX_RSYNC_GIT:-1}" == 1 ]] || excludes+=(--exclude .git/)
  run rsync -az -e "$(rsync_ssh)" "${excludes[@]}" "$ROOT/" "$HOST:$REMOTE_DIR/"

  # 3. Build the environment, write the run script into WORKDIR and start it in tmux.
  local env_vars=()
  local name
  for name in KINETIX_LOCKED KINETIX_DETERMINISTIC KINETIX_BACKEND KINETIX_PYTHON; do
    if [[ -n "${!name:-}" ]]; then
      env_vars+=("$name=${!name}")
    fi
  done
  # ${a[@]+"${a[@]}"}: empty arrays under `set -u` in the bash 3.2 of macOS laptops.
  local train=(env ${env_vars[@]+"${env_vars[@]}"} launch/local.sh --config "$CONFIG"
    --workdir "$WORKDIR" "$@")
  local script
  script="$(
    cat <<EOF
#!/usr/bin/env bash
# Written by launch/cloud_vm.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ); runs in tmux session $SESSION.
set -uo pipefail
cd "\$1"  # the repository on the host (absolute; given by the tmux command)
$(printf '%q ' "${train[@]}") 2>&1 | tee -a $(printf '%q' "$WORKDIR/train.log")
status=\${PIPESTATUS[0]}
echo "\$status" > $(printf '%q' "$WORKDIR/exit_code")
echo "kinetix run ended with exit code \$status"
if [[ $shutdown == 1 ]]; then
  echo "powering off in $delay min (sudo shutdown -c cancels)"
  if [[ "\$(id -u)" == 0 ]]; then shutdown -h +$delay; else sudo -n shutdown -h +$delay; fi
fi
exit "\$status"
EOF
  )"
  # The run script travels inside the remote script as a quoted here-document, so only plain
  # words pass through the remote login shell.
  remote "$REMOTE_DIR" "$WORKDIR" ${env_vars[@]+"${env_vars[@]}"} <<EOF
set -euo pipefail
cd "\$1"
workdir="\$2"
shift 2
env "\$@" KINETIX_SETUP_ONLY=1 launch/local.sh
mkdir -p "\$workdir"
rm -f "\$workdir/exit_code"
cat > "\$workdir/cloud_run.sh" <<'KINETIX_RUN_SCRIPT_EOF'
$script
KINETIX_RUN_SCRIPT_EOF
run_cmd="bash \$(printf '%q' "\$workdir/cloud_run.sh") \$(printf '%q' "\$PWD")"
tmux new-session -d -s $SESSION "\$run_cmd"
echo "started tmux session '$SESSION' on \$(hostname): log in \$workdir/train.log"
EOF
}

cmd_sync() {
  local wait=0
  case "${1:-}" in
    "") ;;
    --wait) wait=1 ;;
    *) die "unknown sync option '$1'." ;;
  esac
  need_rsync
  local remote_path="$WORKDIR"
  [[ "$remote_path" == /* ]] || remote_path="$REMOTE_DIR/$WORKDIR"
  run mkdir -p "$LOCAL_WORKDIR"
  # With --wait: until WORKDIR/exit_code arrives; failed attempts (network, busy host) retry.
  while true; do
    if ! run rsync -az -e "$(rsync_ssh)" "$HOST:$remote_path/" "$LOCAL_WORKDIR/"; then
      [[ "$wait" == 1 ]] || die "rsync from $HOST:$remote_path failed."
      echo "launch/cloud_vm.sh: sync failed; retrying in ${SYNC_EVERY_S:-300} s" >&2
    fi
    if [[ "$wait" == 0 || "$DRY_RUN" == 1 || -f "$LOCAL_WORKDIR/exit_code" ]]; then
      break
    fi
    sleep "${SYNC_EVERY_S:-300}"
  done
  echo "synced $HOST:$remote_path -> $LOCAL_WORKDIR" >&2
  if [[ -f "$LOCAL_WORKDIR/exit_code" ]]; then
    echo "run ended with exit code $(cat "$LOCAL_WORKDIR/exit_code")" >&2
  fi
}

cmd_attach() {
  run ssh -t ${ssh_opts[@]+"${ssh_opts[@]}"} "$HOST" tmux attach -t "$SESSION"
}

cmd_status() {
  remote "$REMOTE_DIR" "$WORKDIR" <<'EOF'
set -uo pipefail
cd "$1"
if tmux has-session -t kinetix 2>/dev/null; then
  echo "running (tmux session 'kinetix' on $(hostname))"
elif [[ -f "$2/exit_code" ]]; then
  echo "finished with exit code $(cat "$2/exit_code")"
else
  echo "not running, and $2/exit_code does not exist"
fi
[[ -f "$2/train.log" ]] && tail -n 20 "$2/train.log"
if command -v nvidia-smi >/dev/null; then
  nvidia-smi --query-gpu=index,utilization.gpu,memory.used,memory.total --format=csv
fi
exit 0
EOF
}

subcommand="$1"
shift
"cmd_$subcommand" "$@"
