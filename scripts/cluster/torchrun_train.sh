#!/usr/bin/env bash
# One node of a multi-node training run of one variant, launched by torchrun. On every node, from
# its copy of the project (same code and environment, data/prepared made by `dvc repro prepare`):
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example.org VARIANT=full_attention scripts/cluster/torchrun_train.sh
#
# params.yaml must agree: train.num_nodes = NNODES, train.devices = NPROC_PER_NODE,
# train.strategy: ddp, and train.checkpoint_dir a folder every node shares (NFS, or s3://BUCKET/...).
# Rank 0 alone writes to MLflow, metrics/VARIANT.json and the checkpoints.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON_BIN="${PYTHON_BIN:-.venv/bin}"
exec "$PYTHON_BIN/torchrun" \
  --nnodes "${NNODES:?set NNODES, the number of nodes}" \
  --nproc-per-node "${NPROC_PER_NODE:-1}" \
  --node-rank "${NODE_RANK:?set NODE_RANK, 0 on the node MASTER_ADDR names}" \
  --master-addr "${MASTER_ADDR:?set MASTER_ADDR, the address of node 0}" \
  --master-port "${MASTER_PORT:-29500}" \
  -m pipeline.train --variant "${VARIANT:?set VARIANT, a key of models.variants}"
