"""Paired A / B of the fused CPU op's C++ at two or more commits, in one process.

    python -m bench.ab_inproc OLD NEW [NEWER...] [--seqlen 8192] [--rounds 20] [--threads 2]
                              [--out outputs/bench/ab_inproc.json]

Each commit's ``nsa/ops`` sources (``git show``; ``WORKTREE`` for the working tree) are built as an
extension of their own; then every round runs one forward and one forward+backward of the whole NSA
op (``bench.attention``'s ``nsa_forward``, paper blocks) through each build in turn, alternating the
order, on the same inputs, through this tree's Python wrapper (so the commits must share the C++
op's signatures). Reported: each build's best and median times and, per build against the first,
the median and quartiles of the per-round time ratios.

Why: on a shared machine the time of one call drifts by ±10% within minutes, and separate
processes differ by a few percent on their own (two long-lived processes running the same build
measured 2-6% apart, whichever ran first), so a few-percent change is lost between separate
runs (``bench/ab_cpu_op.sh``). Builds side by side in one process, a round apart, see the same
machine state, memory and inputs.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from bench.common import print_table, write_json

WORKTREE = "WORKTREE"
ROOT = Path(__file__).resolve().parent.parent


def sources(commit: str, into: Path) -> Path:
    """``nsa/ops``'s C++ files at ``commit`` (or the working tree) copied into ``into``."""
    from nsa.ops import cpu_build

    into.mkdir(parents=True, exist_ok=True)
    for f in [*cpu_build.SOURCES, *cpu_build.HEADERS]:
        rel = f.relative_to(ROOT).as_posix()
        if commit == WORKTREE:
            text = f.read_bytes()
        else:
            text = subprocess.run(["git", "show", f"{commit}:{rel}"], cwd=ROOT, check=True, capture_output=True).stdout
        (into / f.name).write_bytes(text)
    return into


def build(commit: str, tmp: Path):
    """The extension built from ``commit``'s sources as the op builds itself (cpu_build), under a
    name of its own (the sources' hash), so that the builds load side by side."""
    from nsa.ops import cpu_build

    src = sources(commit, tmp / commit.replace("/", "_"))
    digest = hashlib.sha1(b"".join(f.read_bytes() for f in sorted(src.iterdir()))).hexdigest()[:12]
    return cpu_build.compile_module(f"nsa_ab_{cpu_build._cpu_flags()[1]}_{digest}", src)


def run(commits: list[str], seqlen: int, rounds: int, seed: int = 0) -> dict:
    from bench.attention import NSA_BLOCKS, SHAPE, nsa_forward
    from nsa.ops import cpu_build

    with tempfile.TemporaryDirectory() as tmp:
        mods = [build(c, Path(tmp)) for c in commits]
    H, Hkv, D = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, seqlen, h, D, generator=g).requires_grad_(True) for h in (H, Hkv, Hkv))

    def once(mod) -> tuple[float, float]:
        cpu_build._module, cpu_build._tried = mod, True  # the wrapper's cpu_build.require() returns it
        for x in (q, k, v):
            x.grad = None
        t0 = time.perf_counter()
        o = nsa_forward(q, k, v, **NSA_BLOCKS)
        t1 = time.perf_counter()
        o.sum().backward()
        return t1 - t0, time.perf_counter() - t0

    for mod in mods:  # one-time costs (first touch of code, thread pool) outside the rounds
        once(mod)
    times = [[] for _ in commits]
    for r in range(rounds):
        order = range(len(commits)) if r % 2 == 0 else reversed(range(len(commits)))
        for i in order:
            times[i].append(once(mods[i]))
    return {"seqlen": seqlen, "rounds": rounds, "threads": torch.get_num_threads(), "commits": commits,
            "times": times, "summary": summarize(commits, times)}


def _quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return q[0], q[1], q[2]


def summarize(commits: list[str], times: list[list[tuple[float, float]]]) -> list[dict]:
    """Per build: best / median forward and forward+backward seconds and, against the first build,
    the quartiles of the per-round ratios (below 1: faster)."""
    rows = []
    for c, ts in zip(commits, times, strict=True):
        row = {"commit": c}
        for j, key in enumerate(("fwd", "fwd_bwd")):
            xs = [t[j] for t in ts]
            row[f"{key}_best_s"], row[f"{key}_median_s"] = min(xs), statistics.median(xs)
            ratios = [a[j] / b[j] for a, b in zip(ts, times[0], strict=True)]
            row[f"{key}_ratio_q1"], row[f"{key}_ratio_median"], row[f"{key}_ratio_q3"] = _quartiles(ratios)
        rows.append(row)
    return rows


COLUMNS = ["commit", "fwd best / median s", "fwd ratio", "fwd+bwd best / median s", "fwd+bwd ratio"]


def cells(row: dict) -> list[str]:
    """A summary row as table cells (also bench.summary's markdown)."""
    f = "{:.3f}".format
    out = [row["commit"]]
    for key in ("fwd", "fwd_bwd"):
        out += [f"{f(row[f'{key}_best_s'])} / {f(row[f'{key}_median_s'])}",
                f"{f(row[f'{key}_ratio_median'])} ({f(row[f'{key}_ratio_q1'])}-{f(row[f'{key}_ratio_q3'])})"]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("commits", nargs="+", help=f"commits (or {WORKTREE}); the first is the base of the ratios")
    p.add_argument("--seqlen", type=int, default=8192)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=Path("outputs/bench/ab_inproc.json"))
    args = p.parse_args(argv)
    if len(args.commits) < 2:
        p.error("give at least two commits")
    torch.set_num_threads(args.threads)
    res = run(args.commits, args.seqlen, args.rounds)
    print_table(
        f"NSA op (cpu) at T={args.seqlen}, {res['threads']} threads, {args.rounds} alternating rounds in one "
        f"process: seconds, and ratio to {args.commits[0]} (median of the rounds, quartiles)",
        COLUMNS, [cells(r) for r in res["summary"]])
    write_json(args.out, res)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
