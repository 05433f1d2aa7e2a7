#!/usr/bin/env bash
# One process on this machine (all its local devices: CPU, one or more GPUs, or a single TPU host).
#   launch/local.sh [--dry-run] CONFIG WORKDIR [ddlm.main flags...]
#   launch/local.sh experiments/quickstart.py runs/quickstart --config.train.steps=100
# Rerunning the same command resumes from the workdir's latest checkpoint; a SIGTERM (kill PID) saves a
# checkpoint at the next step boundary and exits 0. --dry-run prints the command instead of running it.
# PYTHON: the interpreter (default: python).
set -euo pipefail
usage="usage: launch/local.sh [--dry-run] CONFIG WORKDIR [flags...]"
dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
config=${1:?$usage}
workdir=${2:?$usage}
shift 2
cd "$(dirname "$0")/.."
cmd=("${PYTHON:-python}" -m ddlm.main --config="$config" --workdir="$workdir" "$@")
if ((dry_run)); then
  printf '%q ' "${cmd[@]}" | sed 's/ $//'
  echo
  exit 0
fi
exec "${cmd[@]}"
