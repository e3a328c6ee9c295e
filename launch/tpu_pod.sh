#!/usr/bin/env bash
# ImageNet pretraining on a Cloud TPU VM pod slice (e.g. v4-32, v5p-64): one process per TPU VM host.
#
#   export TPU_NAME=my-pod ZONE=us-central2-b PROJECT=my-project
#   launch/tpu_pod.sh setup                                   # install on every host (once)
#   launch/tpu_pod.sh run configs/pretrain_imagenet.py:b /mnt/shared/runs/imagenet_b \
#       --config.data.data_dir=/mnt/shared/tensorflow_datasets
#   launch/tpu_pod.sh stop                                    # SIGTERM every host: checkpoint, exit 75
# Logs: WORKDIR/host_<hostname>.log.
#
# The repository is copied to ~/rwkvunet-jax on every host (REPO_URL to clone instead), with a
# virtual environment in ~/rwkvunet-jax/.venv holding jax[tpu]. WORKDIR and the data must be on storage
# that every host mounts at the same path (a Filestore/NFS share or a gcsfuse mount).
#
# jax.distributed.initialize() finds the coordinator and the host's index from the TPU metadata
# (--distributed=on). On a maintenance event or `stop`, every host gets SIGTERM; JAX's preemption service
# makes all of them checkpoint at the same step and exit with 75, and `run` starts them again (which
# resumes) up to MAX_RESTARTS times. For spot/preemptible slices that are deleted, recreate the slice and
# rerun `setup` and `run`: the run resumes from WORKDIR.
#
# The WKV operator: the configs' wkv_impl="auto" runs the Pallas TPU (Mosaic) kernel of the chunked form on
# TPU hosts (rwkvunet_jax/kernels/bi_wkv_tpu.py). Another one: append --config.model.wkv_impl=chunked
# (the same form in plain XLA), =scan (token-by-token loops) or =pallas (the kernel, explicitly).
set -euo pipefail

: "${TPU_NAME:?set TPU_NAME}"
: "${ZONE:?set ZONE}"
PROJECT="${PROJECT:-$(gcloud config get-value project 2>/dev/null)}"
REPO_DIR="${REPO_DIR:-\$HOME/rwkvunet-jax}"
MAX_RESTARTS="${MAX_RESTARTS:-20}"
PID_FILE="/tmp/rwkvunet-pretrain.pid"

on_all_hosts() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone "$ZONE" --project "$PROJECT" --worker=all --command "$1"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  setup)
    if [[ -n "${REPO_URL:-}" ]]; then
      on_all_hosts "rm -rf $REPO_DIR && git clone --depth 1 $REPO_URL $REPO_DIR"
    else
      here="$(cd "$(dirname "$0")/.." && pwd)"
      tarball="$(mktemp -d)/rwkvunet-jax.tar.gz"
      git -C "$here" archive --format=tar.gz -o "$tarball" HEAD
      gcloud compute tpus tpu-vm scp "$tarball" "$TPU_NAME:rwkvunet-jax.tar.gz" --zone "$ZONE" --project "$PROJECT" --worker=all
      on_all_hosts "rm -rf $REPO_DIR && mkdir -p $REPO_DIR && tar -xzf rwkvunet-jax.tar.gz -C $REPO_DIR"
    fi
    on_all_hosts "cd $REPO_DIR && python3 -m venv .venv && . .venv/bin/activate && pip install -q --upgrade pip \
      && pip install -q 'jax[tpu]' && pip install -q -e '.[data]'"
    ;;
  run)
    if [[ $# -lt 2 ]]; then
      echo "usage: $0 run CONFIG WORKDIR [rwkvunet pretrain flags...]" >&2
      exit 2
    fi
    config="$1"
    workdir="$2"
    shift 2
    extra="$(printf ' %q' "$@")"
    # Each host loops while its process reports a preemption (75); any other status ends the loop.
    # The pid file lets `stop` signal exactly the training process.
    remote="cd $REPO_DIR && . .venv/bin/activate && mkdir -p $workdir && for i in \$(seq 0 $MAX_RESTARTS); do \
      rwkvunet pretrain --config $config --workdir $workdir --distributed=on $extra >> $workdir/host_\$(hostname).log 2>&1 & \
      pid=\$!; echo \$pid > $PID_FILE; wait \$pid; status=\$?; rm -f $PID_FILE; \
      [ \$status -eq 75 ] || exit \$status; echo \"\$(hostname): preempted, restarting\"; sleep 10; done"
    on_all_hosts "$remote"
    ;;
  stop)
    on_all_hosts "[ -f $PID_FILE ] && kill -TERM \$(cat $PID_FILE) || echo \"\$(hostname): not running\""
    ;;
  *)
    echo "usage: $0 setup | run CONFIG WORKDIR [flags...] | stop   (env: TPU_NAME, ZONE, PROJECT)" >&2
    exit 2
    ;;
esac
