#!/usr/bin/env bash
# Start train.py on this TPU VM worker (tpu_vm_pod.sh runs it on every worker).
#
# A TPU VM made with `gcloud compute tpus tpu-vm create` keeps its worker
# number and its peers in the metadata server, while train.py joins a
# multi-process run by itself only when SLURM_JOB_ID, TPU_WORKER_HOSTNAMES or
# MEGASCALE_COORDINATOR_ADDRESS is in the environment, which the image need
# not export. So this script reads the metadata and passes
# --coordinator_address (worker 0), --num_processes and --process_id
# explicitly (where MEGASCALE_* is set, a multislice run, jax finds
# everything itself and no flags are passed).
#
# train.py runs in a new session (setsid): losing the ssh connection must not
# send it SIGHUP, which it treats as a stop request (save, exit 129).
set -euo pipefail

: "${WORKDIR:?set WORKDIR (gs://bucket/runs/name)}" "${DATA_DIR:?set DATA_DIR (gs://bucket/tensorflow_datasets)}"
PORT=${PORT:-8482}                  # jax's own default for TPU coordinators
PYTHON=${PYTHON:-$HOME/venv/bin/python}
LOG=${LOG:-$HOME/sbam_train.log}
cd "$(dirname "$0")/../.."

meta() {
  curl -sf -H "Metadata-Flavor: Google" \
    "http://metadata.google.internal/computeMetadata/v1/instance/attributes/$1"
}

JOIN=()
if [ -z "${MEGASCALE_COORDINATOR_ADDRESS:-}" ]; then
  WORKER_ID=$(meta agent-worker-number)
  ENDPOINTS=$(meta worker-network-endpoints)   # "host,..." or "name:id:ip,...", worker 0 first
  FIRST=${ENDPOINTS%%,*}
  NUM=$(tr ',' '\n' <<<"$ENDPOINTS" | grep -c .)
  JOIN=(--coordinator_address="${FIRST##*:}:$PORT" --num_processes="$NUM"
        --process_id="$WORKER_ID")
fi

# The recipe at 800 epochs; global batch 4096 whatever the slice (see
# docs/launch.md for accum_steps, remat and checkpoint_every per slice).
setsid "$PYTHON" train.py --config=configs/pretrain.py:large,sbam --workdir="$WORKDIR" \
  ${JOIN[@]+"${JOIN[@]}"} \
  --config.epochs=800 \
  --config.data.source=tfds --config.data.tfds_data_dir="$DATA_DIR" \
  --config.checkpoint_every=10000 --config.log_every=500 \
  "$@" >>"$LOG" 2>&1 </dev/null &
echo $! >"$HOME/sbam_train.pid"
echo "worker ${WORKER_ID:-?}: train.py started (pid $!), log $LOG"
