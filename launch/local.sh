#!/usr/bin/env bash
# One process on this machine (all its local devices: CPU, one or more GPUs, or a single TPU host).
#   launch/local.sh experiments/quickstart.py runs/quickstart [--config.train.steps=100 ...]
# Rerunning the same command resumes from the workdir's latest checkpoint.
set -euo pipefail
config=${1:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
workdir=${2:?usage: launch/local.sh CONFIG WORKDIR [flags...]}
shift 2
cd "$(dirname "$0")/.."
exec python -m ddlm.main --config="$config" --workdir="$workdir" "$@"
