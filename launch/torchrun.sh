#!/usr/bin/env bash
# Single node, N processes (one per GPU; on a CPU-only machine N CPU ranks with gloo).
#   launch/torchrun.sh [hydra overrides...]            NPROC defaults to the GPU count (1 without GPUs)
#   NPROC=8 launch/torchrun.sh experiment=demo deepspeed=zero2
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [[ -z "${NPROC:-}" ]]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | wc -l || true)
  [[ "$NPROC" -ge 1 ]] || NPROC=1
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
exec "$PY" -m torch.distributed.run --standalone --nproc_per_node="$NPROC" -m train "$@"
