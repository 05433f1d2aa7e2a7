#!/usr/bin/env bash
# TPU pod slice: the same command on every worker; jax.distributed.initialize() finds the pod's topology.
#   launch/tpu_pod.sh my-tpu us-central2-b experiments/mdlm.py gs://bucket/runs/mdlm [--config.mesh.fsdp=16 ...]
# The workdir must be shared by all workers (a gs:// path works with orbax). Assumes the repo is checked out
# at ~/ddlm on each worker (install once: `pip install -e ~/ddlm 'jax[tpu]'`). Rerun to resume.
set -euo pipefail
tpu=${1:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
zone=${2:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
config=${3:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
workdir=${4:?usage: launch/tpu_pod.sh TPU_NAME ZONE CONFIG WORKDIR [flags...]}
shift 4
extra=$(printf ' %q' "$@")
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="cd ~/ddlm && \
  python -m ddlm.main --distributed --config=$config --workdir=$workdir$extra"
