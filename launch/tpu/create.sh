#!/usr/bin/env bash
# Create a Cloud TPU VM, or a queued resource that becomes one when capacity frees up.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"

usage() {
  cat <<'EOF_USAGE'
Usage: launch/tpu/create.sh --name NAME --zone ZONE --accelerator-type TYPE [options]

Create a TPU VM (gcloud compute tpus tpu-vm create) or, with --queued, a
queued resource (gcloud compute tpus queued-resources create) whose node has
the same name, so the other scripts work on it unchanged.

  --name NAME               TPU name (also the queued resource id)
  --zone ZONE               e.g. us-central2-b (v4), us-west4-a (v5e)
  --accelerator-type TYPE   e.g. v4-32, v5litepod-16, v5p-8, v6e-16
  --version VERSION         TPU runtime; default by generation:
                              v4 tpu-ubuntu2204-base, v5e v2-alpha-tpuv5-lite,
                              v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e
  --project PROJECT         GCP project (default: gcloud's configured project)
  --spot                    Spot capacity: cheaper, can be preempted
  --best-effort             best-effort queued resource (gcloud alpha); implies --queued
  --reserved                use your reservation's capacity
  --queued                  create a queued resource instead of a TPU VM
  --wait                    with --queued: poll until it is ACTIVE (or fails)
  --dry-run                 print the gcloud commands instead of running them
  -h, --help                show this help
EOF_USAGE
}

accel="" version="" tier="" queued=0 wait=0
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --name) need_value "$@"; NAME=$2; shift 2 ;;
    --zone) need_value "$@"; ZONE=$2; shift 2 ;;
    --project) need_value "$@"; PROJECT=$2; shift 2 ;;
    --accelerator-type) need_value "$@"; accel=$2; shift 2 ;;
    --version) need_value "$@"; version=$2; shift 2 ;;
    --spot | --best-effort | --reserved)
      [[ -z $tier || $tier == "${1#--}" ]] || die "--$tier and $1 exclude each other; pick one capacity tier"
      tier=${1#--}; shift ;;
    --queued) queued=1; shift ;;
    --wait) wait=1; shift ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    *) die "unknown argument $(q "$1") (see --help)" ;;
  esac
done

check_target
[[ -n $accel ]] || die "--accelerator-type is required, e.g. v4-32 or v5litepod-16"
check "$accel" '^v[0-9][a-z0-9]*-[0-9]+$' \
  "--accelerator-type $(q "$accel") is not a TPU type like v4-32 or v5litepod-16"
if [[ -z $version ]]; then
  # The runtime images Cloud TPU documents for JAX on each generation.
  case $accel in
    v4-*) version=tpu-ubuntu2204-base ;;
    v5litepod-* | v5e-*) version=v2-alpha-tpuv5-lite ;;
    v5p-*) version=v2-alpha-tpuv5 ;;
    v6e-*) version=v2-alpha-tpuv6e ;;
    *) die "no default --version for $accel; pass one (gcloud compute tpus versions list --zone=$ZONE)" ;;
  esac
fi
check "$version" '^[a-z0-9][a-z0-9._-]*$' "--version $(q "$version") is not a TPU runtime version"
if [[ $tier == best-effort ]]; then queued=1; fi
if ((wait && !queued)); then die "--wait only applies to --queued (tpu-vm create already waits)"; fi

if ((queued)); then
  # --best-effort exists only in the alpha track of queued-resources create.
  track=()
  if [[ $tier == best-effort ]]; then track=(alpha); fi
  cmd=(gcloud "${track[@]}" compute tpus queued-resources create "$NAME" "${TPU_FLAGS[@]}"
    "--node-id=$NAME" "--accelerator-type=$accel" "--runtime-version=$version")
else
  cmd=(gcloud compute tpus tpu-vm create "$NAME" "${TPU_FLAGS[@]}"
    "--accelerator-type=$accel" "--version=$version")
fi
if [[ -n $tier ]]; then cmd+=("--$tier"); fi
run "${cmd[@]}"

if ((wait)); then
  describe=(gcloud compute tpus queued-resources describe "$NAME" "${TPU_FLAGS[@]}" '--format=value(state.state)')
  if ((DRY_RUN)); then run "${describe[@]}"; exit 0; fi
  poll=${NOISY_FLAX_POLL_SECONDS:-30}
  check "$poll" '^[0-9]+$' "NOISY_FLAX_POLL_SECONDS must be a number of seconds"
  while :; do
    state=$("${describe[@]}")
    case $state in
      ACTIVE) note "$NAME is ACTIVE"; break ;;
      FAILED | SUSPENDED | SUSPENDING) fail "queued resource $NAME is $state; see: ${describe[*]:0:6}" ;;
    esac
    note "$NAME is ${state:-not visible yet}; checking again in ${poll}s"
    sleep "$poll"
  done
fi
