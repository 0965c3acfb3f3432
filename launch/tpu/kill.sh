#!/usr/bin/env bash
# Stop training on every TPU worker and free the TPU: a crashed or interrupted
# run often leaves a python process holding /dev/accel* (v4) or /dev/vfio/*
# (v5e, v5p, v6e), and the next run then fails with "TPU in use".
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/kill.sh --name NAME --zone ZONE [options]

On each worker, signals every process that holds a TPU device (sudo lsof)
plus any noisy_flax.main process, waits for them to exit, and removes the
libtpu lock file.

  --name NAME          TPU name
  --zone ZONE          TPU zone
  --project PROJECT    GCP project (default: gcloud's configured project)
  --signal SIG         KILL (default), or TERM to let noisy_flax checkpoint
                       before it exits, or INT
  --timeout SECONDS    how long to wait for the processes to exit (default 60)
  --worker W           all (default) or worker indices like 0,3
  --dry-run            print the gcloud commands instead of running them
  -h, --help           show this help
EOF_USAGE
}

signal=KILL timeout=60 worker=all
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --signal) need_value "$@"; signal=$2; shift 2 ;;
    --timeout) need_value "$@"; timeout=$2; shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $(q "$1") (see --help)" ;;
  esac
done

check_target
check_worker "$worker"
check "$signal" '^(KILL|TERM|INT)$' "--signal $(q "$signal") must be KILL, TERM or INT"
check "$timeout" '^[0-9]+$' "--timeout $(q "$timeout") must be a number of seconds"

# The [.] keeps pgrep from matching this very command line. The $ in single
# quotes are meant for the worker's shell.
# shellcheck disable=SC2016
remote=(
  'pids=$( { sudo lsof -t -w /dev/accel* /dev/vfio/[0-9]* 2>/dev/null; pgrep -f "noisy_flax[.]main"; } | sort -un | tr "\n" " ")'
  'if [ -z "${pids// /}" ]; then echo "$(hostname): nothing to stop"; else'
  "  echo \"\$(hostname): kill -$signal \$pids\"; sudo kill -s $signal \$pids || true"
  # Each pid on its own: kill -0 with several fails as soon as one is gone.
  '  alive() { local p; for p in $pids; do sudo kill -0 "$p" 2>/dev/null && printf " %s" "$p"; done; }'
  "  for _ in \$(seq $timeout); do [ -z \"\$(alive)\" ] && break; sleep 1; done"
  '  left=$(alive)'
  '  if [ -n "$left" ]; then echo "$(hostname): still running after '"$timeout"'s:$left" >&2; exit 1; fi'
  'fi'
  'sudo rm -f /tmp/libtpu_lockfile'
)
ssh_tpu "$worker" "$(printf '%s\n' "${remote[@]}")"
