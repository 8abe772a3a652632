#!/usr/bin/env bash
# Run a jaxagent config on every worker of a Cloud TPU pod slice.
#
#   launch/tpu_pod.sh create     create the TPU VM slice
#   launch/tpu_pod.sh setup      copy this checkout to every worker, `make appworld` there (venvs, offline set)
#   launch/tpu_pod.sh run        start `python -m jaxagent.train --config $CONFIG $ARGS` on all workers at once
#   launch/tpu_pod.sh ssh CMD    run CMD on every worker (e.g. 'tail -n 5 ~/jaxagent/train.log')
#   launch/tpu_pod.sh delete     delete the slice
#
# Variables (environment; defaults in brackets):
#   TPU_NAME      the slice's name [jaxagent]
#   ZONE          its zone [us-central2-b]
#   ACCELERATOR   slice type, e.g. v4-64, v5p-128 [v4-64]
#   TPU_VERSION   TPU VM software version [tpu-ubuntu2204-base]
#   PROJECT       Google Cloud project [gcloud's default]
#   CONFIG        jaxagent config name [loop_qwen32b]
#   ARGS          extra key=value overrides, e.g. "run_dir=/mnt/runs/q32 env.options.servers=64" []
#   MODEL_DIR     the Hugging Face model folder on every worker (JAXAGENT_MODEL_DIR) [~/models/Qwen2.5-32B-Instruct]
#   APPWORLD_DATA an AppWorld root holding data/ on every worker (APPWORLD_ROOT) [~/appworld]
#   REMOTE_DIR    where the checkout lives on the workers [~/jaxagent]
#
# Every worker runs the same command; JAXAGENT_DISTRIBUTED=auto makes jaxagent.train call
# jax.distributed.initialize(), which finds the pod's coordinator and process ids itself.
set -euo pipefail

TPU_NAME=${TPU_NAME:-jaxagent}
ZONE=${ZONE:-us-central2-b}
ACCELERATOR=${ACCELERATOR:-v4-64}
TPU_VERSION=${TPU_VERSION:-tpu-ubuntu2204-base}
CONFIG=${CONFIG:-loop_qwen32b}
ARGS=${ARGS:-}
MODEL_DIR=${MODEL_DIR:-'~/models/Qwen2.5-32B-Instruct'}
APPWORLD_DATA=${APPWORLD_DATA:-'~/appworld'}
REMOTE_DIR=${REMOTE_DIR:-'~/jaxagent'}
PROJECT_FLAG=${PROJECT:+--project=$PROJECT}

all_workers() {
  gcloud compute tpus tpu-vm ssh "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --worker=all --command="$1"
}

case "${1:-}" in
  create)
    gcloud compute tpus tpu-vm create "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG \
      --accelerator-type="$ACCELERATOR" --version="$TPU_VERSION" ;;
  setup)
    here=$(cd "$(dirname "$0")/.." && pwd)
    tar -C "$here" --exclude=.venv --exclude=.appworld --exclude=runs -czf /tmp/jaxagent.tgz .
    gcloud compute tpus tpu-vm scp /tmp/jaxagent.tgz "$TPU_NAME":/tmp/ --zone="$ZONE" $PROJECT_FLAG --worker=all
    all_workers "mkdir -p $REMOTE_DIR && tar -C $REMOTE_DIR -xzf /tmp/jaxagent.tgz && cd $REMOTE_DIR && \
      make .venv/.installed-run && .venv/bin/pip install --quiet 'jax[tpu]' && make appworld" ;;
  run)
    all_workers "cd $REMOTE_DIR && JAXAGENT_DISTRIBUTED=auto JAXAGENT_MODEL_DIR=$MODEL_DIR \
      APPWORLD_ROOT=$APPWORLD_DATA nohup .venv/bin/python -m jaxagent.train --config $CONFIG $ARGS \
      > train.log 2>&1 &" ;;
  ssh)
    shift
    all_workers "$*" ;;
  delete)
    gcloud compute tpus tpu-vm delete "$TPU_NAME" --zone="$ZONE" $PROJECT_FLAG --quiet ;;
  *)
    sed -n '2,23p' "$0"
    exit 2 ;;
esac
