#!/usr/bin/env bash
# The GPU measurement suite: one run on one H100/H200-class GPU, about 8 minutes.
#
#   bash bench/gpu_suite.sh [OUT_DIR]        (default: outputs/gpu_suite)
#
# 1. the kernel tests on the GPU (bf16 and fp16 included: what the CPU interpreter cannot check)
# 2. bench.kernels: each NSA branch, the selection step and the whole op vs full causal attention (SDPA)
# 3. bench.decode: decode step time, NSA vs full attention, next to the expected ratios
# 4. bench.train_throughput: tokens/s and MFU of a ~1B model, NSA vs full attention, 8k and 32k context
# 5. a summary table (summary.md) and JSON files, all under OUT_DIR.
#
# Each stage has its own time limit so that one slow stage cannot eat the others' time;
# set QUICK=1 for a shorter subset. It needs only torch, triton, pytest and safetensors
# (no Hydra, DeepSpeed or network), so it runs on a bare CUDA image.
set -uo pipefail
OUT_DIR=${1:-outputs/gpu_suite}
PY=${PYTHON:-python3}
QUICK=${QUICK:-0}
export PYTHONUNBUFFERED=1 TRITON_INTERPRET=0
mkdir -p "$OUT_DIR"
log="$OUT_DIR/suite.log"
: > "$log"

stage() {  # stage NAME TIMEOUT_S CMD...
  local name=$1 limit=$2; shift 2
  echo "=== [$name] $(date -u +%H:%M:%S) $*" | tee -a "$log"
  local t0=$SECONDS
  timeout "$limit" "$@" 2>&1 | tee -a "$log"
  local rc=${PIPESTATUS[0]}
  echo "=== [$name] rc=$rc in $((SECONDS - t0)) s" | tee -a "$log"
  echo "$name $rc $((SECONDS - t0))" >> "$OUT_DIR/stages.txt"
}

: > "$OUT_DIR/stages.txt"
{
  date -u +"date: %Y-%m-%d %H:%M UTC"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/gpu: /'
  $PY -c "import torch, triton; print('torch:', torch.__version__, '| triton:', triton.__version__, '| cuda:', torch.version.cuda)"
  echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$OUT_DIR/env.txt" | tee -a "$log"

if [ "$QUICK" = 1 ]; then
  KSEQ="8192 32768 65536"; KCFG="paper"; DSEQ="8192 32768"; TSEQ="8192"
else
  KSEQ="8192 16384 32768 65536"; KCFG="paper g4 g8"; DSEQ="8192 16384 32768 65536"; TSEQ="8192 32768"
fi

XDIST=""
$PY -c "import xdist" 2>/dev/null && XDIST="-n 8"
stage tests 180 $PY -m pytest tests/nsa -q -x $XDIST -p no:cacheprovider
stage kernels 240 $PY -m bench.kernels --seqlens $KSEQ --configs $KCFG --out "$OUT_DIR/kernels.json"
stage decode 60 $PY -m bench.decode --device cuda --contexts $DSEQ --out "$OUT_DIR/decode.json"
stage train 150 $PY -m bench.train_throughput --seqlens $TSEQ --out "$OUT_DIR/train.json"
stage summary 30 $PY -m bench.summary "$OUT_DIR" --out "$OUT_DIR/summary.md"
echo "outputs in $OUT_DIR"
