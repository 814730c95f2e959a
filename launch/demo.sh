#!/usr/bin/env bash
# `make demo`: NSA and full attention trained side by side on this machine, evaluated and compared
# in outputs/demo/report.md (a plain-words verdict at the top). Three pairs of runs, each pair with
# the same seed, data order and steps: language models on the Python standard library (held-out
# loss, speed); retrieval models on synthetic copy documents whose answers lie beyond NSA's sliding
# window (can NSA fetch them through its compressed and selected branches?); and those retrieval
# models trained on further with the list to copy hidden in a haystack (a needle-in-a-haystack grid).
# The stages are the commands a cluster user types (the demo is configs, not a separate code path):
#
#   1 tokenizer       python -m data.tokenizer data=pystdlib tokenizer=bpe4096
#   2 data            python -m data.prepare   data=pystdlib tokenizer=bpe4096
#   3 train           python -m train experiment=demo attention=nsa   and   attention=full, side by side
#                       (exports to outputs/runs/demo-{nsa,full}/export; same seed, data order, steps;
#                       one thread each on a CPU; wandb group demo)
#   4 train-retrieval python -m train experiment=demo_retrieval attention=nsa   and   attention=full
#                       (synthetic data, prepared by the first run)
#   5 train-niah      python -m train experiment=demo_retrieval_niah attention=nsa   and   attention=full
#                       (train.init_from=outputs/runs/demo_retrieval-{nsa,full}: haystack copies)
#   6 eval-ppl        python -m eval task=ppl  checkpoint=outputs/runs/demo-{nsa,full}   (held-out loss by position)
#   7 eval-retrieval  python -m eval task=retrieval checkpoint=outputs/runs/demo_retrieval-{nsa,full}   (held-out copies)
#   8 eval-niah       python -m eval task=niah eval@niah=niah_copy checkpoint=outputs/runs/demo_retrieval_niah-{nsa,full}
#   9 compare         python -m eval.compare outputs/runs/demo-{nsa,full} outputs/runs/demo_retrieval-{nsa,full} outputs/runs/demo_retrieval_niah-{nsa,full} --out outputs/demo
#
# A stage is skipped when its outputs exist and its stamp (outputs/demo/.stamps/) records the same
# command and input fingerprint, so a second `make demo` redoes nothing; `rm -r outputs/demo/.stamps`
# forces a rerun (training then resumes from its final checkpoint; after a change of its config or
# overrides a pair trains from scratch). On a CUDA machine the same
# command trains there in bf16 (device=auto; attention.backend=null picks the Triton kernels).
# Environment: PYTHON (interpreter, default .venv/bin/python); DEMO_OVERRIDES (extra
# `python -m train` overrides for every run, e.g. "train.max_steps=20" for a smoke test).
# Sourced (`source launch/demo.sh`), it only defines the stage helpers (launch/compare_small.sh).
set -euo pipefail

# fingerprint FILE...: sha256 over the named files' contents (a missing file counts as empty).
fingerprint() {
    local f
    for f in "$@"; do
        echo "## $f"
        if [[ -f $f ]]; then cat "$f"; fi
    done | sha256sum | cut -c1-16
}

# stage NUM NAME "OUTPUT PATHS" "INPUT FILES" -- COMMAND...: run COMMAND unless every output exists
# and the stamp $STAMPS/NAME holds the same command + input fingerprint; appends the stage's wall
# seconds and CPU seconds (user+sys of its processes) to $TIMES. Needs STAMPS, TIMES, STAGES.
# COMMAND sees STAGE_STALE=1 when the stamp records another command or other inputs (what it made
# before is out of date: a training run must start over) and 0 when there is no stamp (the stage
# never finished: a training run resumes).
stage() {
    local num=$1 name=$2 outputs=$3 inputs=$4
    shift 5
    local key stamp=$STAMPS/$name done=1 f stale=0
    # shellcheck disable=SC2086  # inputs/outputs are space-separated path lists
    key="$* | $(fingerprint $inputs)"
    for f in $outputs; do [[ -e $f ]] || done=0; done
    if [[ -f $stamp && "$(cat "$stamp")" == "$key" ]]; then
        if [[ $done == 1 ]]; then
            echo "== [$num/$STAGES] $name: up to date, skipped"
            return
        fi
    elif [[ -f $stamp ]]; then
        stale=1
    fi
    echo "== [$num/$STAGES] $name: $*"
    local t0 c0 c1
    t0=$(date +%s)
    _child_cpu
    c0=$CPU_NOW
    STAGE_STALE=$stale "$@"
    _child_cpu
    c1=$CPU_NOW
    local dt=$(( $(date +%s) - t0 ))
    mkdir -p "$STAMPS"
    echo "$key" >"$stamp"
    printf '%s\t%s\t%s\n' "$name" "$dt" "$(awk -v a="$c0" -v b="$c1" 'BEGIN{printf "%.1f", b-a}')" >>"$TIMES"
    echo "== [$num/$STAGES] $name: done in ${dt}s"
}

# _child_cpu: sets CPU_NOW to the user+sys seconds of this shell's finished children (bash `times`,
# second line). Called directly, not in $(...): a subshell's `times` counts only its own children.
_child_cpu() {
    local f=${TMPDIR:-/tmp}/nsa_stage_times.$$
    times >"$f"
    CPU_NOW=$(tail -n 1 "$f" | awk '{t=0; for (i=1; i<=2; i++) {split($i, p, "m"); t += p[1]*60 + p[2]} printf "%.1f", t}')
    rm -f "$f"
}

# stage_times_table FILE: the last recorded run of each stage as a markdown table.
stage_times_table() {
    echo "| stage | wall s | CPU s (user+sys) |"
    echo "|---|---|---|"
    awk -F'\t' '{w[$1]=$2; c[$1]=$3; if (!($1 in seen)) {seen[$1]=1; order[n++]=$1}}
                END {for (i=0; i<n; i++) printf "| %s | %s | %s |\n", order[i], w[order[i]], c[order[i]]}' "$1"
}

# cpu_env: on a CPU, OpenMP workers sleep instead of spinning while they wait. With the default
# spin policy a 2-thread torch slows down by 10-50x as soon as another process shares the cores.
cpu_env() {
    export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}
}

# run_setup NAME: PY, OUT=outputs/NAME, STAMPS, TIMES, T_START, DEVICE_DESC and TRAIN_DEVICE (bf16 on
# a CUDA GPU, the config's fp32 on a CPU, where cpu_env is applied).
run_setup() {
    PY=${PYTHON:-.venv/bin/python}
    OUT=outputs/$1
    STAMPS=$OUT/.stamps
    TIMES=$OUT/stage_times.tsv
    T_START=$(date +%s)
    mkdir -p "$STAMPS"
    export PYTHONUNBUFFERED=1 WANDB_SILENT=true HYDRA_FULL_ERROR=1
    if [[ $("$PY" -c 'import torch; print(int(torch.cuda.is_available()))') == 1 ]]; then
        DEVICE_DESC="CUDA: $("$PY" -c 'import torch; print(torch.cuda.get_device_name())')"
        TRAIN_DEVICE=(train.precision=bf16)
    else
        DEVICE_DESC="CPU: $(nproc) cores"
        TRAIN_DEVICE=()
        cpu_env
    fi
}

# eval_runs NAME: stages eval-<task>-<run> for each task of EVAL_TASKS (default: ppl
# niah; the overrides of task x are the array X_ARGS, e.g. PPL_ARGS, which must be set; task=x is
# passed here) and each run outputs/runs/NAME-<a>, a in RUNS; numbered from $num on. Appends the
# result files to EVALS and the run dirs to COMPARED (for compare_runs). A stage's stamp covers the
# exported model and the evaluation configs, so editing either re-runs it.
eval_runs() {
    local name=$1 task a run
    local -a args tasks=(ppl niah)
    [[ -n ${EVAL_TASKS+set} ]] && tasks=("${EVAL_TASKS[@]}")
    for task in "${tasks[@]}"; do
        if ! declare -p "${task^^}_ARGS" &>/dev/null; then
            echo "eval_runs: EVAL_TASKS has $task but ${task^^}_ARGS is not set" >&2
            return 1
        fi
        local -n task_args="${task^^}_ARGS"
        args=("${task_args[@]}")
        unset -n task_args
        for a in "${RUNS[@]}"; do
            run=outputs/runs/$name-$a
            stage $num "eval-$task-$a" "outputs/eval/$name-$a/$task/results.json" \
                "$run/export/model.safetensors configs/eval.yaml $(echo configs/eval/*.yaml)" -- \
                "$PY" -m eval task="$task" "${args[@]}" checkpoint="$run" progress=false wandb.enabled=true
            EVALS+=" outputs/eval/$name-$a/$task/results.json"
        done
        num=$((num + 1))
    done
    for a in "${RUNS[@]}"; do
        [[ " ${COMPARED[*]} " == *" outputs/runs/$name-$a "* ]] || COMPARED+=("outputs/runs/$name-$a")
    done
}

# compare_runs: stage compare of every run in COMPARED into $OUT/report.md (inputs: EVALS).
compare_runs() {
    stage $num compare "$OUT/report.md" "$EVALS" -- "$PY" -m eval.compare "${COMPARED[@]}" --out "$OUT"
}

# eval_and_compare NAME: eval_runs NAME, then compare_runs (one pair of runs).
eval_and_compare() {
    EVALS="" COMPARED=()
    eval_runs "$1"
    compare_runs
}

_any_alive() {
    local p
    for p in "$@"; do kill -0 "$p" 2>/dev/null && return 0; done
    return 1
}

# train_both EXPERIMENT THREADS [OVERRIDE...]: `python -m train experiment=EXPERIMENT attention=<a>`
# for every a in RUNS at once (THREADS OpenMP threads each: on 2 cores two 1-thread runs side by
# side finish sooner than one 2-thread run after the other, and see the same machine), with the
# same extra overrides; logs in $OUT/train-EXPERIMENT-<a>.log, their steps printed every minute. Its
# arguments are part of the stage's stamp, so a run with other overrides (a smoke test) is never
# taken for this one; under a stale stamp (STAGE_STALE=1) the runs' folders are removed first, so
# they start over instead of resuming a run trained with other settings.
train_both() {
    local name=$1 threads=$2
    shift 2
    local pids=() a rc=0 t=0 t0 first=outputs/runs/$name-${RUNS[0]}/metrics.jsonl
    t0=$(date +%s)
    if [[ ${STAGE_STALE:-0} == 1 ]]; then  # trained before with another config: never resume that
        for a in "${RUNS[@]}"; do rm -rf "outputs/runs/$name-$a"; done
    fi
    for a in "${RUNS[@]}"; do
        OMP_NUM_THREADS=$threads "$PY" -m train experiment="$name" attention="$a" "$@" \
            >"$OUT/train-$name-$a.log" 2>&1 &
        pids+=($!)
        # the first run prepares the data (if needed); the others start once its data is ready (it
        # says it starts or resumes, which comes after the data, not at a line start: a progress
        # bar's tqdm.write clears the line first; or it logged a step) or it has exited, so that no
        # two runs write the shards at once and none waits for NSA's op build
        while kill -0 "${pids[0]}" 2>/dev/null && ! [[ -f $first && $(stat -c %Y "$first") -ge $t0 ]] &&
            ! grep -qE "starting .* from scratch in |resumed from .* at step " "$OUT/train-$name-${RUNS[0]}.log" 2>/dev/null; do
            sleep 1
        done
    done
    while _any_alive "${pids[@]}"; do
        sleep 1
        t=$((t + 1))
        if (( t % 60 == 0 )); then
            local line="" m
            for a in "${RUNS[@]}"; do
                m=outputs/runs/$name-$a/metrics.jsonl
                # `|| true`: a run with no metrics yet (tail fails) must not end the script under
                # set -e + pipefail, an assignment takes its command substitution's status
                line+=" $a: step $(tail -n 1 "$m" 2>/dev/null | sed -n 's/^{"step": \([0-9]*\).*/\1/p' || true)"
            done
            echo "   [$(date -u +%H:%M:%S)]$line"
        fi
    done
    for pid in "${pids[@]}"; do wait "$pid" || rc=$?; done
    if (( rc != 0 )); then
        echo "training failed (exit $rc): see $OUT/train-$name-*.log" >&2
        tail -n 20 "$OUT"/train-"$name"-*.log >&2
        return "$rc"
    fi
}

# run_exports EXPERIMENT: the exported weights of outputs/runs/EXPERIMENT-<a>, a in RUNS (train_both's outputs)
run_exports() {
    local a
    for a in "${RUNS[@]}"; do printf 'outputs/runs/%s-%s/export/model.safetensors ' "$1" "$a"; done
}

# fresh DIR COMMAND...: run a training stage in an empty run dir, so a stage redone after a config
# change starts over instead of resuming the old run's final checkpoint
fresh() {
    local dir=$1
    shift
    rm -rf "$dir"
    "$@"
}

# inputs of the retrieval probe's training stages besides the experiment's and the attention's configs
PROBE_CONFIGS="configs/train.yaml configs/model/tiny.yaml configs/data/pystdlib_longctx.yaml"
PROBE_CONFIGS+=" configs/schedule/constant.yaml data/synthetic.py"

# lookup_stage NUM NAME RUN ATTENTION_OVERRIDE...: the retrieval probe's stage 1 for RUN,
# `python -m train experiment=retrieval_probe_lookup` (a content look-up learnt on short
# associative-recall documents) into outputs/runs/NAME_lookup-RUN: where a run that must retrieve
# starts from (the probe's stage 2, compare_small). Its stamp is outputs/NAME/.stamps/lookup-RUN
# whichever script runs it, so the probe and compare_small share one training. The caller's EXTRA
# overrides and TRAIN_DEVICE are appended.
lookup_stage() {
    local num=$1 name=$2 run=$3
    shift 3
    local prefix
    prefix=$(lookup_run "$name")
    STAMPS=outputs/$name/.stamps stage "$num" "lookup-$run" "outputs/runs/$prefix-$run/export/model.safetensors" \
        "configs/experiment/retrieval_probe_lookup.yaml $PROBE_CONFIGS configs/attention/${1#attention=}.yaml" -- \
        fresh "outputs/runs/$prefix-$run" "$PY" -m train experiment=retrieval_probe_lookup name="$name" "$@" \
        run_name="$prefix-$run" "${TRAIN_DEVICE[@]}" "${EXTRA[@]}"
}

# lookup_run NAME: the run-name prefix of NAME's stage 1 (lookup_stage): its runs are
# outputs/runs/<prefix>-<run>, where the next stage's train.init_from points
lookup_run() {
    echo "${1}_lookup"
}

[[ ${BASH_SOURCE[0]} == "$0" ]] || return 0

cd "$(dirname "${BASH_SOURCE[0]}")/.."
NAME=demo
STAGES=9
RUNS=(nsa full)
read -r -a EXTRA <<<"${DEMO_OVERRIDES:-}"
run_setup $NAME
echo "== make demo on $DEVICE_DESC; outputs in $OUT (stage times in $TIMES)"

DATA_ARGS=(data=pystdlib tokenizer=bpe4096)
TOK=outputs/tokenizers/bpe4096.model
DATA=outputs/data/pystdlib-bpe4096
CONFIGS="configs/experiment/demo.yaml configs/train.yaml configs/model/tiny.yaml configs/data/pystdlib.yaml"
RETRIEVAL_CONFIGS="configs/experiment/demo_retrieval.yaml configs/train.yaml configs/model/tiny.yaml"
RETRIEVAL_CONFIGS+=" configs/data/pystdlib_longctx.yaml configs/schedule/constant.yaml data/synthetic.py $TOK"

stage 1 tokenizer "$TOK" "configs/tokenizer/bpe4096.yaml" -- \
    "$PY" -m data.tokenizer "${DATA_ARGS[@]}"
stage 2 data "$DATA/meta.json" "$TOK configs/data/pystdlib.yaml" -- \
    "$PY" -m data.prepare "${DATA_ARGS[@]}"

# each pair trains side by side, one thread per run on a CPU (on a GPU both share it)
ATTN_CONFIGS=""
for a in "${RUNS[@]}"; do ATTN_CONFIGS+=" configs/attention/$a.yaml"; done
stage 3 train "$(run_exports $NAME)" "$CONFIGS$ATTN_CONFIGS $DATA/meta.json" -- \
    train_both $NAME 1 "${TRAIN_DEVICE[@]}" "${EXTRA[@]}"
stage 4 train-retrieval "$(run_exports ${NAME}_retrieval)" "$RETRIEVAL_CONFIGS$ATTN_CONFIGS" -- \
    train_both ${NAME}_retrieval 1 "${TRAIN_DEVICE[@]}" "${EXTRA[@]}"
# the retrieval pair, each run from its own stage 4 (its exports are inputs: a retrained pair is retuned)
stage 5 train-niah "$(run_exports ${NAME}_retrieval_niah)" \
    "configs/experiment/${NAME}_retrieval_niah.yaml $RETRIEVAL_CONFIGS$ATTN_CONFIGS $(run_exports ${NAME}_retrieval)" -- \
    train_both ${NAME}_retrieval_niah 1 "${TRAIN_DEVICE[@]}" \
    "train.init_from=outputs/runs/${NAME}_retrieval-\${attention.kind}" "${EXTRA[@]}"
num=6

# Evaluation. Language models: held-out loss by position at 1x and 2x the training length (plain
# RoPE beyond 2k). Retrieval models: held-out copy documents (teacher-forced, exact answers). Their
# haystack-tuned runs: a copy needle-in-a-haystack grid at 128-512 tokens, 5 depths, 4 needles a cell
# (answers up to ~500 tokens back, NSA's window is 16). The language models never see a retrieval
# task: the passkey grid the demo gave them before was 0 in every cell, measuring nothing.
EVALS="" COMPARED=()
PPL_ARGS=("ppl.lengths=[2048,4096]" ppl.max_windows=8 ppl.num_buckets=16)
EVAL_TASKS=(ppl)
eval_runs $NAME
RETRIEVAL_ARGS=(eval@retrieval=demo_retrieval)
EVAL_TASKS=(retrieval)
eval_runs ${NAME}_retrieval
NIAH_ARGS=(eval@niah=niah_copy "niah.context_lengths=[128,256,512]" "niah.depths=[0.0,0.25,0.5,0.75,1.0]"
           niah.samples_per_cell=4)
EVAL_TASKS=(niah)
eval_runs ${NAME}_retrieval_niah
compare_runs

# Footer: how the report was made (device, commit, stage times of the invocations that did the work).
if ! grep -q '^## How this report was made' "$OUT/report.md"; then
    {
        echo
        echo "## How this report was made"
        echo
        echo "\`make demo\` (launch/demo.sh) on $DEVICE_DESC, commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)."
        echo "Runs: \`python -m train experiment=demo attention=nsa|full\` (language models, ~0.6M tokens of code)"
        echo "and \`python -m train experiment=demo_retrieval attention=nsa|full\` (retrieval models: synthetic copy"
        echo "documents only, NSA window 16) and \`experiment=demo_retrieval_niah\` (the retrieval models, 250 steps"
        echo "more with the list hidden in a haystack; the NIAH grid), each pair with the same seed, data order and"
        echo "steps; offline wandb runs under \`outputs/runs/demo*/wandb/\`. The longer retrieval experiment, answers"
        echo "200-900 tokens back: \`launch/retrieval_probe.sh\` (docs/results/retrieval_probe). Stage times:"
        echo
        stage_times_table "$TIMES"
    } >>"$OUT/report.md"
fi
echo "== make demo finished in $(( $(date +%s) - T_START ))s (this invocation)"
echo "== report: $(pwd)/$OUT/report.md"
