#!/usr/bin/env bash
# TPU pod slice: the same command on every worker (gcloud ... ssh --worker=all); ddlm.main joins them with
# jax.distributed (--distributed: jax reads the slice's topology from the TPU VM metadata).
#
#   launch/tpu_pod.sh [--dry-run] [--create TYPE] [--setup] TPU_NAME ZONE CONFIG WORKDIR [ddlm.main flags...]
#   launch/tpu_pod.sh --create v4-32 --setup my-tpu us-central2-b experiments/mdlm.py gs://bucket/runs/mdlm \
#       --config.mesh.fsdp=16
#
# --create TYPE   reuse the TPU VM slice TPU_NAME if it exists, else create it (accelerator TYPE, runtime
#                 $TPU_VERSION, default tpu-ubuntu2204-base; add SPOT=1 for spot capacity)
# --setup         on every worker: clone $REPO_URL into ~/ddlm (or pull) and pip install it with jax[tpu]
# --dry-run       print the gcloud commands instead of running them
#
# WORKDIR must be a gs:// path (every worker writes its shards there; orbax commits each checkpoint once),
# and so should any data the config reads from outside the repository (--config.data.data_dir=gs://...).
# Preemption (spot/maintenance) sends SIGTERM: every worker saves a checkpoint at the next step boundary
# and exits 0. Rerunning the same command resumes from WORKDIR.
set -euo pipefail
usage="usage: launch/tpu_pod.sh [--dry-run] [--create TYPE] [--setup] TPU_NAME ZONE CONFIG WORKDIR [flags...]"
dry_run=0 create="" setup=0
while [[ "${1:-}" == --* ]]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --create) create=${2:?$usage}; shift 2 ;;
    --setup) setup=1; shift ;;
    *) echo "launch/tpu_pod.sh: error: unknown option $1; $usage" >&2; exit 2 ;;
  esac
done
tpu=${1:?$usage}
zone=${2:?$usage}
config=${3:?$usage}
workdir=${4:?$usage}
shift 4
if [[ "$workdir" != gs://* ]]; then
  echo "launch/tpu_pod.sh: error: WORKDIR=$workdir must be a gs:// path that every worker can write" >&2
  exit 2
fi

run() {  # prints (dry run) or runs one command, given as a single shell string
  if ((dry_run)); then echo "$1"; else bash -c "$1"; fi
}
q() { printf '%q' "$1"; }

vm="gcloud compute tpus tpu-vm"
if [[ -n "$create" ]]; then
  spot=""
  if [[ "${SPOT:-0}" == 1 ]]; then spot=" --spot"; fi
  run "$vm describe $(q "$tpu") --zone=$(q "$zone") >/dev/null 2>&1 || $vm create $(q "$tpu") --zone=$(q "$zone") --accelerator-type=$(q "$create") --version=$(q "${TPU_VERSION:-tpu-ubuntu2204-base}")$spot"
fi
if ((setup)); then
  repo=${REPO_URL:?"launch/tpu_pod.sh: --setup needs REPO_URL (the git URL of this repository)"}
  remote="(git clone $(q "$repo") ~/ddlm || git -C ~/ddlm pull) && pip install -e ~/ddlm 'jax[tpu]'"
  run "$vm ssh $(q "$tpu") --zone=$(q "$zone") --worker=all --command=$(q "$remote")"
fi
train="cd ~/ddlm && python -m ddlm.main --distributed --config=$(q "$config") --workdir=$(q "$workdir")"
for flag in "$@"; do train+=" $(q "$flag")"; done
run "$vm ssh $(q "$tpu") --zone=$(q "$zone") --worker=all --command=$(q "$train")"
