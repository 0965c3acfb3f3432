#!/usr/bin/env bash
# Put the code on every TPU worker and install noisy_flax[tpu] into a venv there.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/setup.sh --name NAME --zone ZONE [options]

Copy the code to every worker (a git archive of the local checkout at --ref,
default HEAD: commit first, uncommitted changes are not copied) or, with
--repo, have every worker fetch it from a git URL; then create a venv and
pip install -e '.[tpu]' in it.

  --name NAME          TPU name
  --zone ZONE          TPU zone
  --project PROJECT    GCP project (default: gcloud's configured project)
  --repo URL           fetch the code from this git URL instead of copying
  --ref REF            commit, branch or tag to copy / fetch (default HEAD)
  --remote-dir DIR     code directory on the workers, relative to the remote
                       home (default noisy_flax)
  --venv DIR           venv, relative to the code directory (default .venv)
  --python PY          interpreter for the venv (default python3.11; apt
                       installs it and its venv module when missing)
  --extras LIST        pip extras to install (default tpu)
  --worker W           all (default) or worker indices like 0,3
  --dry-run            print the commands instead of running them
  -h, --help           show this help
EOF_USAGE
}

repo="" ref=HEAD remote_dir=noisy_flax venv=.venv python=python3.11 extras=tpu worker=all
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --repo) need_value "$@"; repo=$2; shift 2 ;;
    --ref) need_value "$@"; ref=$2; shift 2 ;;
    --remote-dir) need_value "$@"; remote_dir=$2; shift 2 ;;
    --venv) need_value "$@"; venv=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --extras) need_value "$@"; extras=$2; shift 2 ;;
    --worker) need_value "$@"; worker=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $(q "$1") (see --help)" ;;
  esac
done

check_target
check_worker "$worker"
check_remote_path --remote-dir "$remote_dir"
check_remote_path --venv "$venv"
check "$python" '^(python3(\.[0-9]+)?|/[A-Za-z0-9_./-]+)$' \
  "--python $(q "$python") must be python3, python3.X or an absolute path"
check "$extras" '^[a-z0-9_-]+(,[a-z0-9_-]+)*$' "--extras $(q "$extras") must be a comma list like tpu or tpu,test"
# A ref or URL starting with '-' would be read by git as an option.
check "$ref" '^[A-Za-z0-9_.][A-Za-z0-9_./^~-]*$' "--ref $(q "$ref") is not a git commit, branch or tag"
if [[ -n $repo ]]; then
  check "$repo" '^(https?://|ssh://|git@|file://|/)[^[:space:]]+$' \
    "--repo $(q "$repo") must be a git URL (https://, ssh://, git@host:, file:// or an absolute path)"
fi

# Install step, run on the workers after the code is in place.
install=(
  "cd $(q "$remote_dir")"
  "if ! command -v $(q "$python") >/dev/null || ! $(q "$python") -c 'import ensurepip, venv' 2>/dev/null; then
  sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(q "$python") $(q "$python-venv")
fi"
  "[ -x $(q "$venv/bin/python") ] || $(q "$python") -m venv $(q "$venv")"
  "$(q "$venv/bin/pip") install -q --upgrade pip"
  "$(q "$venv/bin/pip") install -q -e $(q ".[$extras]")"
  "$(q "$venv/bin/python") -c 'import jax, noisy_flax; print(\"noisy_flax ready, jax\", jax.__version__)'"
)

if [[ -n $repo ]]; then
  # init + fetch + checkout works the same on a fresh worker and on a rerun.
  fetch=(
    "set -e"
    "mkdir -p $(q "$remote_dir")"
    "git -C $(q "$remote_dir") init -q"
    "git -C $(q "$remote_dir") fetch -q --depth=1 $(q "$repo") $(q "$ref")"
    "git -C $(q "$remote_dir") checkout -q -f --detach FETCH_HEAD"
  )
  ssh_tpu "$worker" "$(printf '%s\n' "${fetch[@]}" "${install[@]}")"
  exit 0
fi

git -C "$ROOT" rev-parse --verify --quiet "$ref^{commit}" >/dev/null ||
  die "--ref $(q "$ref") is not a commit in $ROOT"
if [[ -n $(git -C "$ROOT" status --porcelain --untracked-files=no) ]]; then
  note "warning: uncommitted changes in $ROOT are not copied (copying $ref)"
fi
make_tmp_dir  # a dry run prints the mktemp instead of making it
archive=$TMP_DIR/noisy_flax-src.tar.gz
remote_archive=noisy_flax-src.tar.gz  # in the remote home
run git -C "$ROOT" archive --format=tar.gz -o "$archive" "$ref"
run gcloud compute tpus tpu-vm scp "$archive" "$NAME:$remote_archive" "${TPU_FLAGS[@]}" "--worker=$worker"
unpack=(
  "set -e"
  "mkdir -p $(q "$remote_dir")"
  "tar -xzf $remote_archive -C $(q "$remote_dir")"
  "rm -f $remote_archive"
)
ssh_tpu "$worker" "$(printf '%s\n' "${unpack[@]}" "${install[@]}")"
drop_tmp_dir
