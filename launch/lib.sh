# shellcheck shell=bash
# Shared helpers for the launch/ scripts: argument parsing, validation,
# quoting for remote shells, and --dry-run. Source it; do not run it.
#
# Exit codes: 2 for a usage error (one line on stderr), 1 for a failure
# at run time (a command failed, a resource is in a bad state).

PROG=${0##*/}
DRY_RUN=0
TMP_PLACEHOLDER=""

die() { printf '%s: error: %s\n' "$PROG" "$*" >&2; exit 2; }
fail() { printf '%s: %s\n' "$PROG" "$*" >&2; exit 1; }
note() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# q WORD: WORD quoted so that bash reads it back as exactly one literal word.
# Everything that reaches a remote shell goes through here; the remote login
# shell on TPU VMs (and in SLURM batch scripts we generate) is bash, which is
# what printf %q quotes for.
q() { printf '%q' "$1"; }

# quote_args WORD...: the words quoted and joined by spaces, one shell line.
quote_args() {
  local out="" a
  for a in "$@"; do out+="${out:+ }$(q "$a")"; done
  printf '%s' "$out"
}

# run CMD...: run it, or with --dry-run print it as a line bash can paste.
run() {
  if ((DRY_RUN)); then
    local line shown
    line=$(quote_args "$@")
    # The directory of make_tmp_dir is named "$tmp", as the printed lines set it.
    # shellcheck disable=SC2016  # a literal $tmp, for bash to expand when pasted
    shown='"$tmp"'
    if [[ -n $TMP_PLACEHOLDER ]]; then line=${line//"$TMP_PLACEHOLDER"/$shown}; fi
    printf '%s\n' "$line"
    return 0
  fi
  command -v "$1" >/dev/null 2>&1 || fail "$1 not found on PATH"
  "$@"
}

# make_tmp_dir: sets TMP_DIR to a new private directory, removed when the
# script exits. mktemp names it only at run time, so a dry run prints the
# mktemp (as tmp=...) and shows the directory as "$tmp" in the lines that use
# it; with drop_tmp_dir at the end, the printed lines paste as one real run.
make_tmp_dir() {
  if ((DRY_RUN)); then
    # Only characters printf %q leaves alone, so run() finds it in its lines.
    TMP_PLACEHOLDER=/NOISY_FLAX_DRY_RUN_TMP
    TMP_DIR=$TMP_PLACEHOLDER
    # shellcheck disable=SC2016  # printed for bash to expand when pasted
    printf '%s\n' 'tmp=$(mktemp -d)'
    return 0
  fi
  TMP_DIR=$(mktemp -d)
  trap 'rm -rf "$TMP_DIR"' EXIT
}

# drop_tmp_dir: what the EXIT trap of make_tmp_dir does, as a printed line.
drop_tmp_dir() {
  # shellcheck disable=SC2016  # printed for bash to expand when pasted
  if ((DRY_RUN)); then printf '%s\n' 'rm -rf "$tmp"'; fi
}

# split_args ARG...: sets ARGS with every --flag=value split into --flag value,
# so each script parses one form. --config.x=y overrides stay whole (they are
# passed through to noisy_flax.main), and so does everything after "--" and
# the value after --sbatch-arg (itself an option like --qos=high).
split_args() {
  ARGS=()
  local a prev="" rest=0
  for a in "$@"; do
    if ((rest)) || [[ $a != --*=* || $a == --config.* || $prev == --sbatch-arg ]]; then
      ARGS+=("$a")
    else
      ARGS+=("${a%%=*}" "${a#*=}")
    fi
    if [[ $a == -- ]]; then rest=1; fi
    prev=$a
  done
}

# need_value FLAG [VALUE...]: FLAG must be followed by a value.
need_value() {
  if (($# < 2)) || [[ -z $2 || $2 == -* ]]; then die "$1 needs a value"; fi
}

# check VALUE REGEX MESSAGE: die with MESSAGE unless VALUE matches REGEX.
check() {
  [[ $1 =~ $2 ]] || die "$3"
}

# The TPU target shared by the tpu/ scripts.
NAME="" ZONE="" PROJECT=""

check_target() {
  [[ -n $NAME ]] || die "--name is required (see --help)"
  [[ -n $ZONE ]] || die "--zone is required (see --help)"
  check "$NAME" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' \
    "--name $(q "$NAME") is not a TPU name: lower-case letters, digits and '-', starting with a letter"
  check "$ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' \
    "--zone $(q "$ZONE") is not a zone like us-central2-b"
  if [[ -n $PROJECT ]]; then
    check "$PROJECT" '^([a-z0-9.-]+:)?[a-z][-a-z0-9]{4,28}[a-z0-9]$' \
      "--project $(q "$PROJECT") is not a GCP project id"
  fi
  TPU_FLAGS=("--zone=$ZONE")
  if [[ -n $PROJECT ]]; then TPU_FLAGS+=("--project=$PROJECT"); fi
}

# Which workers a command goes to: all, or a comma list of indices.
check_worker() {
  check "$1" '^(all|[0-9]+(,[0-9]+)*)$' "--worker $(q "$1") must be 'all' or worker indices like 0 or 0,3"
}

# A directory on the workers, relative to the remote home unless absolute.
check_remote_path() {
  check "$2" '^[A-Za-z0-9_./+][A-Za-z0-9_./+-]*$' \
    "$1 $(q "$2") must be a plain path (letters, digits, . _ / + -), relative to the remote home or absolute"
}

# ssh_tpu WORKER COMMAND: run a shell command line on TPU workers. A dry run
# also shows the remote command unquoted, on stderr, for people to read.
ssh_tpu() {
  if ((DRY_RUN)); then
    printf '# on worker(s) %s of %s:\n' "$1" "$NAME" >&2
    printf '#   %s\n' "${2//$'\n'/$'\n'#   }" >&2
  fi
  run gcloud compute tpus tpu-vm ssh "$NAME" "${TPU_FLAGS[@]}" "--worker=$1" "--command=$2"
}
