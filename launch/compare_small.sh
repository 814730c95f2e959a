#!/usr/bin/env bash
# NSA vs full attention, the longer CPU experiment (33-45 minutes on 2 cores after the probe's stage 1):
#
#   1 tokenizer   python -m data.tokenizer data=pystdlib tokenizer=bpe4096   (the demo's tokenizer)
#   2 lookup-<a>  python -m train experiment=retrieval_probe_lookup attention=<a> run_name=retrieval_probe_lookup-<a>
#                 (the retrieval probe's stage 1, a = nsa, full: a content look-up learnt on short
#                 associative-recall documents, shared with launch/retrieval_probe.sh; measured 12 min full, 15-23 nsa)
#   3 train       python -m train experiment=compare_small attention=nsa   } at the same time, one core each
#                 python -m train experiment=compare_small attention=full  } (same seed, data order, steps)
#                 with train.init_from=outputs/runs/retrieval_probe_lookup-<a>
#   4 eval-ppl    python -m eval task=ppl  checkpoint=outputs/runs/compare_small-{nsa,full}  (1x, 2x, 4x length)
#   5 eval-niah   python -m eval task=niah eval@niah=niah_passkey checkpoint=...  (passkey at 1x, 2x, 4x the
#                 1024-token training length)
#   6 eval-retrieval  python -m eval task=retrieval checkpoint=...  (held-out passkey, MQAR, copy documents)
#   7 compare     python -m eval.compare ... --out outputs/compare_small
#
# Stages skip like launch/demo.sh's (stamps in outputs/compare_small/.stamps; stage 2's in
# outputs/retrieval_probe/.stamps, as the probe's). Both runs train
# concurrently so that they reach the same step at about the same time; the NSA run prepares the
# mixture's shards first (the full run starts once the NSA run has logged its first step).
# Logs: outputs/compare_small/*.log.
# Environment: PYTHON, COMPARE_OVERRIDES (extra `python -m train` overrides for both runs),
# COMPARE_THREADS (OpenMP threads per training run, default 1), COMPARE_PUBLISH (see the end).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source=launch/demo.sh
source launch/demo.sh
NAME=compare_small
STAGES=7
RUNS=(nsa full)
read -r -a EXTRA <<<"${COMPARE_OVERRIDES:-}"
run_setup $NAME
echo "== compare_small on $DEVICE_DESC; outputs in $OUT"

stage 1 tokenizer outputs/tokenizers/bpe4096.model "configs/tokenizer/bpe4096.yaml" -- \
    "$PY" -m data.tokenizer data=pystdlib tokenizer=bpe4096
# a curriculum: each run starts from a content look-up learnt on short documents (without it, neither
# model formed one on this mixture in 4000 steps: docs/results/compare_small/diagnosis)
for a in "${RUNS[@]}"; do lookup_stage 2 retrieval_probe "$a" "attention=$a"; done
TRAIN_CONFIGS="configs/experiment/$NAME.yaml configs/train.yaml configs/model/tiny.yaml configs/data/pystdlib_longctx.yaml"
LOOKUP=$(lookup_run retrieval_probe)
TRAIN_CONFIGS+=" configs/attention/nsa.yaml configs/attention/full.yaml $(run_exports "$LOOKUP")"
stage 3 train "$(run_exports $NAME)" "$TRAIN_CONFIGS" -- train_both $NAME "${COMPARE_THREADS:-1}" "${TRAIN_DEVICE[@]}" \
    "train.init_from=outputs/runs/$LOOKUP-\${attention.kind}" "${EXTRA[@]}"

# 1x, 2x and 4x the training length (1024); plain RoPE extrapolation beyond it.
PPL_ARGS=("ppl.lengths=[1024,2048,4096]" ppl.train_length=1024 ppl.max_windows=16 ppl.num_buckets=16)
# the classic passkey test (repeated filler, the training documents' wording): configs/eval/niah_passkey.yaml
NIAH_ARGS=(eval@niah=niah_passkey "niah.context_lengths=[1024,2048,4096]"
           "niah.depths=[0.0,0.25,0.5,0.75,1.0]" niah.samples_per_cell=4 niah.max_new_tokens=8)
# in-distribution retrieval: held-out passkey / MQAR / copy documents like the training mixture's
RETRIEVAL_ARGS=(retrieval.num_documents=64)
EVAL_TASKS=(ppl niah retrieval)
num=4
eval_and_compare $NAME
# COMPARE_PUBLISH=DIR: copy the small results (report, figures, evaluation results, stage times,
# the runs' resolved configs) to DIR, e.g. docs/results/compare_small, for committing.
if [[ -n ${COMPARE_PUBLISH:-} ]]; then
    mkdir -p "$COMPARE_PUBLISH"
    cp "$OUT"/report.md "$OUT"/*.png "$TIMES" "$COMPARE_PUBLISH/"
    for a in "${RUNS[@]}"; do
        for task in "${EVAL_TASKS[@]}"; do cp "outputs/eval/$NAME-$a/$task/results.json" "$COMPARE_PUBLISH/$a-$task.json"; done
        cp "outputs/runs/$NAME-$a/config.yaml" "$COMPARE_PUBLISH/$a-config.yaml"
    done
    echo "== published to $COMPARE_PUBLISH"
fi
echo "== compare_small finished in $(( $(date +%s) - T_START ))s (this invocation); stage times:"
stage_times_table "$TIMES"
echo "== report: $(pwd)/$OUT/report.md"
