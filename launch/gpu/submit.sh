#!/usr/bin/env bash
# Write a SLURM batch script for multi-node GPU training and submit it.
# One task per GPU: jax.distributed.initialize() reads SLURM_* (process count,
# id, first node as coordinator) and gives each task the GPU numbered by its
# SLURM_LOCALID, so every task must see all GPUs of its node.
set -euo pipefail
# shellcheck source=launch/lib.sh
source "$(dirname "${BASH_SOURCE[0]}")/../lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)

usage() {
  cat <<'EOF_USAGE'
Usage: launch/gpu/submit.sh --nodes N --config FILE[:ARGS] --workdir DIR [options]
         [--config.key=value ...] [-- MAIN_ARGS...]

Generates a batch script that runs, with srun, one process per GPU of
  python -m noisy_flax.main --config FILE[:ARGS] --workdir DIR [overrides]
and submits it with sbatch. The code directory, the venv and the workdir must
be on a file system all nodes share (or the workdir on gs://).

  --nodes N             number of nodes (default 1)
  --gpus-per-node G     GPUs per node = tasks per node (default 8)
  --cpus-per-gpu C      CPU cores per task, for the input pipeline (default 8)
  --config SPEC         e.g. configs/noisyvit_imagenet.py:variant=B/16,res=224
  --workdir DIR         absolute path on the shared file system, or gs://...
  --data-dir DIR        TFDS_DATA_DIR for the job (default: left unset)
  --env KEY=VALUE       extra environment variable for the job (repeatable)
  --config.KEY=VALUE    config override, passed through (repeatable)
  -- ARGS...            everything after -- is passed to noisy_flax.main as is
  --job-name NAME       SLURM job name (default noisy_flax)
  --partition P         SLURM partition
  --account A           SLURM account
  --time T              time limit, e.g. 2-00:00:00
  --sbatch-arg ARG      extra #SBATCH option, e.g. --sbatch-arg=--exclusive
                        (repeatable)
  --code-dir DIR        code directory on the cluster (default: this checkout)
  --python PY           interpreter (default <code-dir>/.venv/bin/python)
  --log-dir DIR         where SLURM writes the job log
                        (default <code-dir>/workdirs/slurm-logs)
  --script-out FILE     where to write the batch script
                        (default <log-dir>/<job-name>-<time>.sbatch)
  --dry-run             print the batch script and the sbatch command only
  -h, --help            show this help
EOF_USAGE
}

nodes=1 gpus=8 cpus=8 config="" workdir="" data_dir="" job=noisy_flax partition="" account="" time_limit=""
code_dir=$ROOT python="" log_dir="" script_out=""
envs=() sbatch_args=() extra=()
split_args "$@"
set -- "${ARGS[@]}"
while (($#)); do
  case $1 in
    --nodes) need_value "$@"; nodes=$2; shift 2 ;;
    --gpus-per-node) need_value "$@"; gpus=$2; shift 2 ;;
    --cpus-per-gpu) need_value "$@"; cpus=$2; shift 2 ;;
    --config) need_value "$@"; config=$2; shift 2 ;;
    --workdir) need_value "$@"; workdir=$2; shift 2 ;;
    --data-dir) need_value "$@"; data_dir=$2; shift 2 ;;
    --env) need_value "$@"; envs+=("$2"); shift 2 ;;
    --job-name) need_value "$@"; job=$2; shift 2 ;;
    --partition) need_value "$@"; partition=$2; shift 2 ;;
    --account) need_value "$@"; account=$2; shift 2 ;;
    --time) need_value "$@"; time_limit=$2; shift 2 ;;
    --sbatch-arg)
      # Its value starts with "--", which need_value would take for a flag.
      (($# >= 2)) || die "--sbatch-arg needs a value"
      sbatch_args+=("$2"); shift 2 ;;
    --code-dir) need_value "$@"; code_dir=$2; shift 2 ;;
    --python) need_value "$@"; python=$2; shift 2 ;;
    --log-dir) need_value "$@"; log_dir=$2; shift 2 ;;
    --script-out) need_value "$@"; script_out=$2; shift 2 ;;
    --dry-run) DRY_RUN=1; shift ;;
    -h | --help) usage; exit 0 ;;
    --config.*=*) extra+=("$1"); shift ;;
    --) shift; extra+=("$@"); break ;;
    *) die "unknown argument $(q "$1") (see --help; config overrides look like --config.key=value)" ;;
  esac
done

positive() { check "$2" '^[1-9][0-9]*$' "$1 $(q "$2") must be a positive whole number"; }
positive --nodes "$nodes"
positive --gpus-per-node "$gpus"
positive --cpus-per-gpu "$cpus"
[[ -n $config ]] || die "--config is required, e.g. configs/noisyvit_imagenet.py:variant=B/16,res=224"
check "$config" '^[A-Za-z0-9_.][A-Za-z0-9_./-]*\.py(:.*)?$' \
  "--config $(q "$config") must be a config file path ending in .py, optionally followed by :ARGS"
[[ -n $workdir ]] || die "--workdir is required: a directory all nodes share"
check "$workdir" '^(/|gs://).+' "--workdir $(q "$workdir") must be an absolute path on a shared file system or gs://..."
if [[ -n $data_dir ]]; then
  check "$data_dir" '^(/|gs://).+' "--data-dir $(q "$data_dir") must be an absolute path or gs://..."
fi
# These land on #SBATCH lines, which sbatch parses itself: keep them to one plain word.
check "$job" '^[A-Za-z0-9_.-]+$' "--job-name $(q "$job") may hold only letters, digits, . _ -"
if [[ -n $partition ]]; then check "$partition" '^[A-Za-z0-9_.,-]+$' "--partition $(q "$partition") is not a partition name"; fi
if [[ -n $account ]]; then check "$account" '^[A-Za-z0-9_.-]+$' "--account $(q "$account") is not an account name"; fi
if [[ -n $time_limit ]]; then
  check "$time_limit" '^([0-9]+-)?[0-9]+(:[0-9]{2}){0,2}$' "--time $(q "$time_limit") must look like 30, 4:00:00 or 2-00:00:00"
fi
for a in "${sbatch_args[@]}"; do
  check "$a" '^--[a-z][a-z-]*(=[^[:space:]]+)?$' "--sbatch-arg $(q "$a") must be one option like --exclusive or --qos=high"
done
check "$code_dir" '^/' "--code-dir $(q "$code_dir") must be an absolute path"
python=${python:-$code_dir/.venv/bin/python}
log_dir=${log_dir:-$code_dir/workdirs/slurm-logs}
# sbatch reads %-patterns and whitespace in --output itself.
check "$log_dir" '^/[^[:space:]%]*$' "--log-dir $(q "$log_dir") must be an absolute path without spaces or %"
exports=("export PYTHONUNBUFFERED=1")  # the job log shows progress as it happens
if [[ -n $data_dir ]]; then exports+=("export TFDS_DATA_DIR=$(q "$data_dir")"); fi
for kv in "${envs[@]}"; do
  check "$kv" '^[A-Za-z_][A-Za-z0-9_]*=' "--env $(q "$kv") must look like KEY=VALUE"
  exports+=("export ${kv%%=*}=$(q "${kv#*=}")")
done

sbatch_lines=(
  "--job-name=$job" "--nodes=$nodes" "--ntasks-per-node=$gpus" "--gpus-per-node=$gpus"
  "--cpus-per-task=$cpus" "--output=$log_dir/%x-%j.out"
)
if [[ -n $partition ]]; then sbatch_lines+=("--partition=$partition"); fi
if [[ -n $account ]]; then sbatch_lines+=("--account=$account"); fi
if [[ -n $time_limit ]]; then sbatch_lines+=("--time=$time_limit"); fi
sbatch_lines+=("${sbatch_args[@]}")

# No --gpus-per-task / --gpu-bind on srun: they would hide the other GPUs and
# JAX's device index (SLURM_LOCALID) would point past the visible ones.
# --cpus-per-task again: srun no longer inherits it from sbatch (Slurm 22.05).
srun_cmd=(srun "--ntasks-per-node=$gpus" "--cpus-per-task=$cpus" --kill-on-bad-exit=1 --label
  "$python" -m noisy_flax.main --config "$config" --workdir "$workdir" "${extra[@]}")

script=$(
  echo "#!/bin/bash"
  echo "# Generated by launch/gpu/submit.sh on $(date -u +%Y-%m-%dT%H:%M:%SZ)."
  printf '#SBATCH %s\n' "${sbatch_lines[@]}"
  echo "set -euo pipefail"
  echo "cd $(q "$code_dir")"
  if ((${#exports[@]})); then printf '%s\n' "${exports[@]}"; fi
  echo "echo \"job \${SLURM_JOB_ID:-?}: $nodes node(s) x $gpus GPUs on \${SLURM_JOB_NODELIST:-?}\""
  quote_args "${srun_cmd[@]}"
  echo
)

if [[ -z $script_out ]]; then script_out=$log_dir/$job-$(date +%Y%m%d-%H%M%S).sbatch; fi
if ((DRY_RUN)); then
  printf '# ---- %s ----\n%s\n# ---- end ----\n' "$script_out" "$script"
  run sbatch --parsable "$script_out"
  exit 0
fi
mkdir -p -- "$log_dir" "$(dirname -- "$script_out")"
printf '%s\n' "$script" >"$script_out"
note "wrote $script_out"
jobid=$(run sbatch --parsable "$script_out")
note "submitted job ${jobid%%;*}; log: $log_dir/$job-${jobid%%;*}.out"
