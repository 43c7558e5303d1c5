#!/usr/bin/env bash
# SBAM ViT-L pre-training on a Cloud TPU VM pod slice, driven from a workstation
# with the gcloud CLI. Every worker runs the same train.py; the workdir and the
# data live in a bucket all of them read and write.
#
#   export TPU_NAME=sbam-v4 ZONE=us-central2-b ACCELERATOR_TYPE=v4-128 \
#          RUNTIME_VERSION=tpu-ubuntu2204-base BUCKET=gs://my-bucket
#   bash scripts/launch/tpu_vm_pod.sh create   # the slice (SPOT=1: a spot slice)
#   bash scripts/launch/tpu_vm_pod.sh setup    # this checkout's HEAD + a venv on every worker
#   bash scripts/launch/tpu_vm_pod.sh train [--config.key=value ...]   # start on every worker
#   bash scripts/launch/tpu_vm_pod.sh logs     # follow worker 0's log
#   bash scripts/launch/tpu_vm_pod.sh stop     # SIGTERM: all processes save one step, exit 143
#   bash scripts/launch/tpu_vm_pod.sh delete
#
# v5e: ACCELERATOR_TYPE=v5litepod-256 RUNTIME_VERSION=v2-alpha-tpuv5-lite.
# `train` again after a stop or a pre-emption resumes from the workdir's
# latest checkpoint. What each setting means: docs/launch.md.
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}" "${ZONE:?set ZONE}" "${BUCKET:?set BUCKET (gs://...)}"
ACCELERATOR_TYPE=${ACCELERATOR_TYPE:-v4-128}
RUNTIME_VERSION=${RUNTIME_VERSION:-tpu-ubuntu2204-base}
RUN=${RUN:-sbam_large_800ep}
WORKDIR=${WORKDIR:-$BUCKET/runs/$RUN}
DATA_DIR=${DATA_DIR:-$BUCKET/tensorflow_datasets}
REPO=$(cd "$(dirname "$0")/../.." && pwd)

tpu() { gcloud compute tpus tpu-vm "$@" --zone="$ZONE"; }
on_all() { tpu ssh "$TPU_NAME" --worker=all --command="$1"; }

case "${1:-}" in
  create)
    tpu create "$TPU_NAME" --accelerator-type="$ACCELERATOR_TYPE" \
      --version="$RUNTIME_VERSION" ${SPOT:+--spot}
    ;;
  setup)
    # The committed tree only, so every worker runs the same code.
    git -C "$REPO" archive --format=tar.gz -o /tmp/sbam_jax.tar.gz HEAD
    tpu scp /tmp/sbam_jax.tar.gz "$TPU_NAME":sbam_jax.tar.gz --worker=all
    # requirements.txt pins jax for Python 3.11; jax[tpu] adds libtpu.
    on_all 'set -e; rm -rf ~/sbam_jax; mkdir -p ~/sbam_jax; tar -xzf ~/sbam_jax.tar.gz -C ~/sbam_jax
      sudo apt-get update -qq && sudo apt-get install -y -qq python3.11 python3.11-venv
      python3.11 -m venv ~/venv && ~/venv/bin/pip install -q -r ~/sbam_jax/requirements.txt \
        "jax[tpu]==$(grep -oP "^jax==\K\S+" ~/sbam_jax/requirements.txt)"'
    ;;
  train)
    shift
    args=""
    if [ $# -gt 0 ]; then args=$(printf '%q ' "$@"); fi
    on_all "WORKDIR=$(printf %q "$WORKDIR") DATA_DIR=$(printf %q "$DATA_DIR") \
      bash ~/sbam_jax/scripts/launch/tpu_worker.sh $args"
    ;;
  logs)
    tpu ssh "$TPU_NAME" --worker=0 --command='tail -n 50 -F ~/sbam_train.log'
    ;;
  stop)
    on_all 'kill -TERM "$(cat ~/sbam_train.pid)" 2>/dev/null || true'
    ;;
  delete)
    tpu delete "$TPU_NAME" --quiet
    ;;
  *)
    sed -n '2,19p' "$0"
    exit 2
    ;;
esac
