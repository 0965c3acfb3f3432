#!/usr/bin/env bash
# Start noisy_flax.main on every TPU worker at once, detached, with one log
# file per worker; JAX's distributed runtime finds the peers by itself.
set -euo pipefail
HERE=$(dirname "${BASH_SOURCE[0]}")
# shellcheck source=launch/lib.sh
source "$HERE/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/run.sh --name NAME --zone ZONE --config FILE[:ARGS] \
         --workdir gs://BUCKET/DIR --data-dir gs://BUCKET/tensorflow_datasets \
         [options] [--config.key=value ...] [-- MAIN_ARGS...]

Runs, on every worker, under nohup:
  python -m noisy_flax.main --config FILE[:ARGS] --workdir gs://... [overrides]
with TFDS_DATA_DIR set and NOISY_FLAX_DISTRIBUTED=1 (start JAX's distributed
runtime, which finds the other workers), logging to
<remote-dir>/logs/run-<time>.log on each worker (logs/latest.log points at
it). Refuses to start while the previous run on a worker is still alive (stop
it with kill.sh).

  --name NAME           TPU name
  --zone ZONE           TPU zone
  --project PROJECT     GCP project (default: gcloud's configured project)
  --config SPEC         config file and argument string, e.g.
                        configs/noisyvit_imagenet.py:variant=B/16,res=224
  --workdir URL         gs:// directory for checkpoints and metrics, shared by
                        all workers
  --data-dir DIR        TFDS_DATA_DIR on the workers (gs://... or absolute path)
  --env KEY=VALUE       extra environment variable for the run (repeatable)
  --config.KEY=VALUE    config override, passed through (repeatable)
  -- ARGS...            everything after -- is passed to noisy_flax.main as is
  --remote-dir DIR      code directory on the workers (default noisy_flax)
  --venv DIR            venv, relative to the code directory (default .venv)
  --worker W            all (default) or worker indices like 0,3
  --follow              stream worker 0's log after starting (logs.sh --follow)
  --dry-run             print the gcloud commands instead of running them
  -h, --help            show this help
EOF_USAGE
}

config="" workdir="" data_dir="" remote_dir=noisy_flax venv=.venv worker=all follow=0
envs=() extra=()
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --env) need_value "$@"; envs+=("$2"); shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --venv) need_value "$@"; venv=$2; shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --follow) follow=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*=*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown argument $(q "$1") (see --help; config overrides look like --config.key=value)" ;;
  esac
done

check_target
check_worker "$worker"
check_remote_path --remote-dir "$remote_dir"
check_remote_path --venv "$venv"
[[ -n $config ]] || die "--config is required, e.g. configs/noisyvit_imagenet.py:variant=B/16,res=224"
check "$config" '^[A-Za-z0-9_.][A-Za-z0-9_./-]*\.py(:.*)?$' \
  "--config $(q "$config") must be a config file path ending in .py, optionally followed by :ARGS"
[[ -n $workdir ]] || die "--workdir is required: a gs:// directory all workers can write"
# Worker disks are private and die with the VM; checkpoints must outlive both.
check "$workdir" '^gs://[a-z0-9][a-z0-9._-]{1,221}(/.*)?$' \
  "--workdir $(q "$workdir") must be a gs://bucket/path that all workers share (bucket names are lowercase letters, digits, -, _ and .)"
[[ -n $data_dir ]] || die "--data-dir is required: where the tfds datasets are, e.g. gs://BUCKET/tensorflow_datasets"
check "$data_dir" '^(gs://[a-z0-9][a-z0-9._-]{1,221}(/.*)?|/.*)$' \
  "--data-dir $(q "$data_dir") must be gs://bucket/path (a lowercase bucket name) or an absolute path on the workers"
# Unbuffered, so the log file shows progress as it happens. A TPU VM made by
# gcloud sets no variable that names its workers (only the metadata server
# knows them): NOISY_FLAX_DISTRIBUTED=1 has noisy_flax.main start JAX's
# distributed runtime, which asks that server. Before --env, which may override it.
exports=("export PYTHONUNBUFFERED=1" "export TFDS_DATA_DIR=$(q "$data_dir")"
  "export NOISY_FLAX_DISTRIBUTED=$(q 1)")
for kv in "${envs[@]}"; do
  check "$kv" '^[A-Za-z_][A-Za-z0-9_]*=' "--env $(q "$kv") must look like KEY=VALUE"
  exports+=("export ${kv%%=*}=$(q "${kv#*=}")")
done

main=("$venv/bin/python" -m noisy_flax.main --config "$config" --workdir "$workdir" "${extra[@]}")
still_going=(
  "if [ -f logs/latest.pid ] && kill -0 \"\$(cat logs/latest.pid)\" 2>/dev/null; then"
  "  echo \"\$(hostname): a run is still going (pid \$(cat logs/latest.pid)); stop it with launch/tpu/kill.sh\" >&2; exit 1"
  "fi"
)
# Every worker is checked before any starts: a worker that refused while the
# others started would leave them waiting for it in jax.distributed.
check=("cd $(q "$remote_dir") 2>/dev/null || exit 0" "${still_going[@]}")
if ! ssh_tpu "$worker" "$(printf '%s\n' "${check[@]}")"; then
  fail "a run is still going on some worker (above); nothing was started"
fi
remote=(
  "set -e"
  "cd $(q "$remote_dir")"
  "mkdir -p logs"
  "${still_going[@]}"
  "${exports[@]}"
  "log=logs/run-\$(date +%Y%m%d-%H%M%S).log"
  "ln -sfn \"\${log#logs/}\" logs/latest.log"
  "nohup $(quote_args "${main[@]}") >\"\$log\" 2>&1 </dev/null &"
  "echo \$! >logs/latest.pid"
  "echo \"\$(hostname): started pid \$!, log \$PWD/\$log\""
)
ssh_tpu "$worker" "$(printf '%s\n' "${remote[@]}")"

if ((follow)); then
  opts=(--name "$NAME" --zone "$ZONE" --remote-dir "$remote_dir" --follow)
  if [[ -n $PROJECT ]]; then opts+=(--project "$PROJECT"); fi
  if ((DRY_RUN)); then opts+=(--dry-run); fi
  exec "$HERE/logs.sh" "${opts[@]}"
fi
