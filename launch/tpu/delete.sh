#!/usr/bin/env bash
# Delete a TPU VM, or a queued resource together with its TPU.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/delete.sh --name NAME --zone ZONE [options]

The workdir and the data on gs:// are kept; worker disks (logs included:
logs.sh --collect first) are lost.

  --name NAME          TPU name (the queued resource id with --queued)
  --zone ZONE          TPU zone
  --project PROJECT    GCP project (default: gcloud's configured project)
  --queued             delete the queued resource and its TPU (--force)
  --yes                do not ask for confirmation (gcloud --quiet)
  --dry-run            print the gcloud command instead of running it
  -h, --help           show this help
EOF_USAGE
}

queued=0 yes=0
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --queued) queued=1; shift ;;
    --yes) yes=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $(q "$1") (see --help)" ;;
  esac
done

check_target
if ((queued)); then
  # --force deletes the TPU node along with the request.
  cmd=(gcloud compute tpus queued-resources delete "$NAME" "${TPU_FLAGS[@]}" --force)
else
  cmd=(gcloud compute tpus tpu-vm delete "$NAME" "${TPU_FLAGS[@]}")
fi
if ((yes)); then cmd+=(--quiet); fi
run "${cmd[@]}"
