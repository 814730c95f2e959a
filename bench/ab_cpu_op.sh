#!/usr/bin/env bash
# A/B of the fused CPU op at two commits, side by side on one machine: each commit in its own git
# worktree with its own TORCH_EXTENSIONS_DIR (the op's build folder is named after the CPU and the
# sources, so two trees sharing one would rebuild it in place), then ROUNDS interleaved rounds of
# `python -m bench.attention --child nsa` (a fresh process per measurement, as bench.attention does)
# per length, one JSON line each, prefixed with the side and length:
#
#   bench/ab_cpu_op.sh OLD_COMMIT NEW_COMMIT [OUT.txt]      (default NEW_COMMIT: the working tree)
#   env: SEQLENS (default "8192"), ROUNDS (default 5), THREADS (default 2), PYTHON (default .venv/bin/python)
#
# Prints the best and median forward / forward+backward time and the range of peak memory of each
# side per length at the end (python -m bench.summary --ab OUT.txt).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
old=${1:?usage: bench/ab_cpu_op.sh OLD_COMMIT [NEW_COMMIT] [OUT.txt]}
new=${2:-}
out=${3:-outputs/bench/ab-$(git rev-parse --short "$old")-${new:-worktree}.txt}
PY=${PYTHON:-.venv/bin/python}
[[ $PY == /* ]] || PY=$(pwd)/$PY  # absolute, not resolved: a venv's python is a symlink
tmp=$(mktemp -d)
trap 'git worktree remove --force "$tmp/old" 2>/dev/null; [[ -n $new ]] && git worktree remove --force "$tmp/new" 2>/dev/null; rm -rf "$tmp"' EXIT
git worktree add -q --detach "$tmp/old" "$old"
if [[ -n $new ]]; then git worktree add -q --detach "$tmp/new" "$new"; new_dir=$tmp/new; else new_dir=$(pwd); fi
mkdir -p "$(dirname "$out")"
: >"$out"
for side in old new; do  # build both before anything is timed
    dir=$tmp/old; [[ $side == new ]] && dir=$new_dir
    (cd "$dir" && TORCH_EXTENSIONS_DIR=$tmp/ext-$side "$PY" -c "from nsa.ops import cpu_build; assert cpu_build.load()")
done
for _ in $(seq 1 "${ROUNDS:-5}"); do
    for T in ${SEQLENS:-8192}; do
        for side in old new; do
            dir=$tmp/old; [[ $side == new ]] && dir=$new_dir
            (cd "$dir" && TORCH_EXTENSIONS_DIR=$tmp/ext-$side OMP_NUM_THREADS=${THREADS:-2} \
                "$PY" -m bench.attention --child nsa --seqlens "$T" --threads "${THREADS:-2}" 2>/dev/null |
                tail -n 1 | sed "s/^/$side $T /") >>"$out"
        done
    done
done
echo "wrote $out"
"$PY" -m bench.summary --ab "$out"  # best / median times and peak memory per side
