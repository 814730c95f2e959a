#!/usr/bin/env bash
# Multi-node torchrun with c10d rendezvous. Run the same command on every node:
#   NNODES=4 NPROC_PER_NODE=8 MASTER_ADDR=node0.cluster MASTER_PORT=29500 RDZV_ID=my-run \
#     launch/multinode.sh experiment=demo deepspeed=zero3 run_name=my-run
# Node ranks are assigned by the rendezvous. The run directory (outputs/runs/<run_name>) must be
# on a filesystem all nodes share: every rank writes its ZeRO shards into the same checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
: "${NNODES:?set NNODES}" "${MASTER_ADDR:?set MASTER_ADDR (host of the rendezvous)}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_PORT=${MASTER_PORT:-29500}
RDZV_ID=${RDZV_ID:-nsa-pretrain}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --nnodes="$NNODES" --nproc_per_node="$NPROC_PER_NODE" \
  --rdzv_backend=c10d --rdzv_endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv_id="$RDZV_ID" \
  --max_restarts=0 -m train "$@"
