#!/usr/bin/env bash
# `make demo`: NSA and full attention pretrained side by side on the Python standard library,
# evaluated and compared in outputs/demo/report.md. The stages are the commands a cluster user
# types (the demo is the config `experiment=demo`, not a separate code path):
#
#   1 tokenizer   python -m data.tokenizer data=pystdlib tokenizer=bpe4096
#   2 data        python -m data.prepare   data=pystdlib tokenizer=bpe4096
#   3 train-nsa   python -m train experiment=demo attention=nsa    (exports to outputs/runs/demo-nsa/export)
#   4 train-full  python -m train experiment=demo attention=full   (same seed, data order, steps; wandb group demo)
#   5 eval-ppl    python -m eval task=ppl  checkpoint=outputs/runs/demo-{nsa,full}   (held-out loss by position)
#   6 eval-niah   python -m eval task=niah checkpoint=outputs/runs/demo-{nsa,full}   (small passkey grid)
#   7 compare     python -m eval.compare outputs/runs/demo-nsa outputs/runs/demo-full --out outputs/demo
#
# A stage is skipped when its outputs exist and a stamp records the same command and inputs
# (configs, upstream outputs), so a second `make demo` redoes nothing; `rm -r outputs/demo/.stamps`
# forces a rerun (training itself resumes from its checkpoints). On a CUDA machine the same
# command trains there in bf16 (device=auto; attention.backend=null picks the Triton kernels).
# Environment: PYTHON (interpreter, default .venv/bin/python), DEMO_OVERRIDES (extra
# `python -m train` overrides for both runs, e.g. "train.max_steps=20" for a smoke test).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-.venv/bin/python}
NAME=demo
OUT=outputs/demo
STAMPS=$OUT/.stamps
TIMES=$OUT/stage_times.tsv
RUNS=(nsa full)
read -r -a EXTRA <<<"${DEMO_OVERRIDES:-}"
mkdir -p "$STAMPS"
export PYTHONUNBUFFERED=1 WANDB_SILENT=true HYDRA_FULL_ERROR=1

T_START=$(date +%s)
CUDA=$("$PY" -c 'import torch; print(int(torch.cuda.is_available()))')
if [[ $CUDA == 1 ]]; then
    DEVICE_DESC="CUDA: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
    TRAIN_DEVICE=(train.precision=bf16)
else
    DEVICE_DESC="CPU: $(nproc) cores"
    TRAIN_DEVICE=()
fi
echo "== make demo on $DEVICE_DESC; outputs in $OUT (stage times in $TIMES)"

# fingerprint FILE...: sha256 over the named files' contents (missing files count as empty).
fingerprint() {
    local f
    for f in "$@"; do
        echo "## $f"
        if [[ -f $f ]]; then cat "$f"; fi
    done | sha256sum | cut -c1-16
}

# stage NUM NAME "OUTPUT FILES" "INPUT FILES" -- COMMAND...: run COMMAND unless every output exists and
# the stamp holds the same command + input fingerprint. Records the wall time of each stage run.
stage() {
    local num=$1 name=$2 outputs=$3 inputs=$4
    shift 5
    # shellcheck disable=SC2086  # inputs/outputs are space-separated path lists
    local key="$* | $(fingerprint $inputs)"
    local stamp=$STAMPS/$name done=1 f
    for f in $outputs; do [[ -e $f ]] || done=0; done
    if [[ $done == 1 && -f $stamp && "$(cat "$stamp")" == "$key" ]]; then
        echo "== [$num/7] $name: up to date, skipped"
        return
    fi
    echo "== [$num/7] $name: $*"
    local t0
    t0=$(date +%s)
    "$@"
    local dt=$(( $(date +%s) - t0 ))
    echo "$key" >"$stamp"
    printf '%s\t%s\n' "$name" "$dt" >>"$TIMES"
    echo "== [$num/7] $name: done in ${dt}s"
}

DATA_ARGS=(data=pystdlib tokenizer=bpe4096)
TOK=outputs/tokenizers/bpe4096.model
DATA=outputs/data/pystdlib-bpe4096
CONFIGS="configs/experiment/demo.yaml configs/train.yaml configs/model/tiny.yaml configs/data/pystdlib.yaml"

stage 1 tokenizer "$TOK" "configs/tokenizer/bpe4096.yaml" -- \
    "$PY" -m data.tokenizer "${DATA_ARGS[@]}"
stage 2 data "$DATA/meta.json" "$TOK configs/data/pystdlib.yaml" -- \
    "$PY" -m data.prepare "${DATA_ARGS[@]}"

num=3
for a in "${RUNS[@]}"; do
    stage $num "train-$a" "outputs/runs/$NAME-$a/export/model.safetensors" \
        "$CONFIGS configs/attention/$a.yaml $DATA/meta.json" -- \
        "$PY" -m train experiment=$NAME attention="$a" "${TRAIN_DEVICE[@]}" "${EXTRA[@]}"
    num=$((num + 1))
done

# Evaluation: perplexity by position at 1x and 2x the training length (plain RoPE beyond 2k), and
# a passkey grid at 512..2048 tokens. Small on purpose: the demo model is ~1.3M parameters.
PPL_ARGS=(task=ppl "ppl.lengths=[2048,4096]" ppl.max_windows=8 ppl.num_buckets=16)
NIAH_ARGS=(task=niah niah.needle=passkey "niah.context_lengths=[512,1024,2048]"
           "niah.depths=[0.0,0.25,0.5,0.75,1.0]" niah.samples_per_cell=1 niah.max_new_tokens=8)
for task in ppl niah; do
    if [[ $task == ppl ]]; then args=("${PPL_ARGS[@]}"); else args=("${NIAH_ARGS[@]}"); fi
    for a in "${RUNS[@]}"; do
        run=outputs/runs/$NAME-$a
        stage $num "eval-$task-$a" "outputs/eval/$NAME-$a/$task/results.json" "$run/export/model.safetensors" -- \
            "$PY" -m eval "${args[@]}" checkpoint="$run" progress=false wandb.enabled=true
    done
    num=$((num + 1))
done

EVALS=""
for a in "${RUNS[@]}"; do EVALS+=" outputs/eval/$NAME-$a/ppl/results.json outputs/eval/$NAME-$a/niah/results.json"; done
stage 7 compare "$OUT/report.md" "$EVALS" -- \
    "$PY" -m eval.compare "outputs/runs/$NAME-nsa" "outputs/runs/$NAME-full" --out "$OUT"

# Footer: how the report was made (device, commit, the stage times of the runs that did the work).
if ! grep -q '^## How this report was made' "$OUT/report.md"; then
    {
        echo
        echo "## How this report was made"
        echo
        echo "\`make demo\` (launch/demo.sh) on $DEVICE_DESC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
        echo "Both runs: \`python -m train experiment=demo attention=nsa|full\` (same seed, data order and steps);"
        echo "offline wandb runs of group \`demo\` under \`outputs/runs/demo-*/wandb/\`."
        echo
        echo "| stage | seconds |"
        echo "|---|---|"
        awk -F'\t' '{printf "| %s | %s |\n", $1, $2}' "$TIMES"
    } >>"$OUT/report.md"
fi
echo "== make demo finished in $(( $(date +%s) - T_START ))s (this invocation)"
echo "== report: $(pwd)/$OUT/report.md"
