#!/usr/bin/env bash
# Show, stream or collect the run logs that run.sh leaves on each TPU worker.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/logs.sh --name NAME --zone ZONE [--follow | --collect DIR] [options]

Without --follow / --collect, prints the last lines of the latest run's log.
Worker 0 (JAX process 0) is the one that reports progress; the others log
their own errors, which is where a hang or crash on one host shows up.

  --name NAME          TPU name
  --zone ZONE          TPU zone
  --project PROJECT    GCP project (default: gcloud's configured project)
  --worker W           0 (default), all, or indices like 0,3; with several
                       workers each line is prefixed with the worker's hostname
  --lines N            how many lines to show first (default 100)
  --follow             keep streaming (tail -F) until interrupted
  --collect DIR        copy every worker's latest log to DIR/worker-<i>.log
  --num-workers N      with --collect: number of workers (default: ask gcloud)
  --remote-dir DIR     code directory on the workers (default noisy_flax)
  --dry-run            print the gcloud commands instead of running them
  -h, --help           show this help
EOF_USAGE
}

worker=0 lines=100 follow=0 collect="" num_workers="" remote_dir=noisy_flax
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --lines) need_value "$@"; lines=$2; shift 2 ;;
    --follow) follow=1; shift ;;
    --collect) need_value "$@"; collect=$2; shift 2 ;;
    --num-workers) need_value "$@"; num_workers=$2; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $(q "$1") (see --help)" ;;
  esac
done

check_target
check_worker "$worker"
check_remote_path --remote-dir "$remote_dir"
check "$lines" '^[0-9]+$' "--lines $(q "$lines") must be a number"
if [[ -n $num_workers ]]; then
  check "$num_workers" '^[1-9][0-9]*$' "--num-workers $(q "$num_workers") must be a positive number"
fi
if ((follow)) && [[ -n $collect ]]; then die "--follow and --collect exclude each other"; fi
log=$remote_dir/logs/latest.log

if [[ -n $collect ]]; then
  if [[ -z $num_workers ]]; then
    describe=(gcloud compute tpus tpu-vm describe "$NAME" "${TPU_FLAGS[@]}" '--format=value(networkEndpoints.len())')
    if ((DRY_RUN)); then
      run "${describe[@]}"
      note "dry run: the worker count comes from the describe above; showing worker 0 only"
      num_workers=1
    else
      num_workers=$("${describe[@]}")
      check "$num_workers" '^[1-9][0-9]*$' "could not read the worker count of $NAME (got $(q "$num_workers")); pass --num-workers"
    fi
  fi
  if ((!DRY_RUN)); then mkdir -p -- "$collect"; fi
  # One scp per worker: the file has the same name on every worker.
  for ((i = 0; i < num_workers; i++)); do
    run gcloud compute tpus tpu-vm scp "$NAME:$log" "$collect/worker-$i.log" "${TPU_FLAGS[@]}" "--worker=$i"
  done
  exit 0
fi

tail_cmd="tail -n $lines"
if ((follow)); then tail_cmd+=" -F"; fi
tail_cmd+=" $(q "$log")"
if [[ $worker == *[!0-9]* ]]; then
  # Several workers interleave on one stream: label every line.
  tail_cmd+=" | sed -u \"s/^/[\$(hostname)] /\""
fi
ssh_tpu "$worker" "$tail_cmd"
