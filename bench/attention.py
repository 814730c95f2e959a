"""NSA (all three branches) vs full causal attention: time and peak memory, side by side.

    python -m bench.attention --device cpu [--seqlens 4096 8192 16384 32768] [--repeats 1]
                              [--threads N] [--breakdown] [--out outputs/bench/attention_cpu.json]

Shapes: B = 1, H = 16, Hkv = 2, D = 64, float32 on CPU; NSA with the paper's blocks
(l=32, d=16, l'=64, n=16, w=512). Per sequence length it measures

* ``nsa``: the whole NSA op through the public API, as the layer calls it
  (``nsa.native_sparse_attention``, default backend: on CPU float32 the fused CPU op, loaded
  before timing, as an import would be): compressed K/V by mean-pooling each block (the
  benchmark stand-in for the compression MLP), compressed attention and block selection in one
  pass, selected and sliding-window attention, summed (gates None: all 1);
* ``sdpa``: ``scaled_dot_product_attention(is_causal=True, enable_gqa=True)``, as the
  ``attention=full`` model runs on CPU (no K/V repeat: 5-10% faster forward+backward than
  repeating K/V to all heads, the baseline of the results before 2026-11-29's fifth session);

forward (with autograd recording, as in training) and forward+backward (``out.sum()``),
reporting the best of ``--repeats`` wall times, the process CPU time, and the peak memory
(rise of the resident set during the call, see ``bench.common.measure``). Each method and
length runs in a fresh subprocess, so one method's freed memory cannot hide the other's, and
the repeats are interleaved rounds (NSA, SDPA, NSA, SDPA, ...), so that a machine whose speed
drifts (a shared VM) biases neither side of a ratio. Each subprocess first runs one short
forward+backward of its method (:func:`warm_up`), so one-time process costs are not measured.
``--breakdown`` adds, in one more subprocess per length, the forward and backward time of each
NSA stage on its own (compression, compressed attention + selection, selected attention,
sliding window), to show where the time goes.
Inputs are random, so the selection is spread over the whole context (no locality). The
JSON is rewritten after each length.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

from bench.common import best, best_of, fmt, measure, print_table, write_json

SHAPE = dict(heads=16, kv_heads=2, head_dim=64)
NSA_BLOCKS = dict(block_len=32, stride=16, select_len=64, num_select=16, window=512)


def nsa_forward(q, k, v, block_len, stride, select_len, num_select, window):
    """The whole NSA attention on ``q [B,T,H,D]``, ``k, v [B,T,Hkv,D]`` -> ``[B,T,H,D]``: the three
    branches summed (gates None), the branches sharing ``k, v``."""
    import nsa

    k_cmp = k.unfold(1, block_len, stride).mean(-1)  # [B, Nc, Hkv, D]: mean of each block
    v_cmp = v.unfold(1, block_len, stride).mean(-1)
    o, _ = nsa.native_sparse_attention(q, k_cmp, v_cmp, k, v, k, v, None, block_len=block_len, stride=stride,
                                       select_len=select_len, num_select=num_select, window=window,
                                       return_selection=False)
    return o


def nsa_stages(q, k, v, block_len, stride, select_len, num_select, window, device) -> dict:
    """Forward and backward wall time of each stage of :func:`nsa_forward`, each stage on its own
    leaf copies of its inputs (so a backward covers that stage only): ``{stage: {"fwd", "bwd"}}``."""
    import nsa

    def leaf(x):
        return x.detach().requires_grad_(True)

    def timed(fwd):
        box = {}
        fwd_m = measure(lambda: box.update(out=fwd()), device)
        outs = box["out"] if isinstance(box["out"], tuple) else (box["out"],)
        loss = sum(o.float().sum() for o in outs if o.requires_grad)
        return box["out"], {"fwd": fwd_m["wall_s"], "bwd": measure(loss.backward, device)["wall_s"]}

    stages = {}
    kl, vl = leaf(k), leaf(v)
    (k_cmp, v_cmp), stages["compression"] = timed(
        lambda: (kl.unfold(1, block_len, stride).mean(-1), vl.unfold(1, block_len, stride).mean(-1))
    )
    blk = dict(block_len=block_len, stride=stride, select_len=select_len, num_select=num_select)
    (_, _, idx), stages["compressed+select"] = timed(
        lambda: nsa.compressed_attention_and_select(leaf(q), leaf(k_cmp), leaf(v_cmp), **blk)
    )
    _, stages["selected"] = timed(lambda: nsa.selected_attention(leaf(q), leaf(k), leaf(v), idx, select_len=select_len))
    _, stages["window"] = timed(lambda: nsa.sliding_window_attention(leaf(q), leaf(k), leaf(v), window=window))
    return stages


def sdpa_forward(q, k, v):
    """Full causal attention through SDPA with native GQA (no K/V repeat)."""
    qt, kt, vt = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    return torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=True, enable_gqa=True).transpose(1, 2)


WARM_UP_LEN = 1024


def warm_up(method: str, g: torch.Generator, device: str) -> None:
    """One forward+backward of ``method`` at ``WARM_UP_LEN`` tokens before anything is measured: the
    process's one-time costs (lazy imports, the thread pool, the first touch of the op's code and
    scratch) belong to neither method's per-call time or memory. Short, so the allocator keeps no
    freed blocks of the measured size (which would hide part of the measured call's peak)."""
    H, Hkv, D = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    q, k, v = (torch.randn(1, WARM_UP_LEN, h, D, generator=g).to(device).requires_grad_(True) for h in (H, Hkv, Hkv))
    out = nsa_forward(q, k, v, **NSA_BLOCKS) if method == "nsa" else sdpa_forward(q, k, v)
    out.sum().backward()


def run_case(method: str, T: int, repeats: int, device: str, seed: int = 0) -> dict:
    """Measure one method at one length in this process."""
    g = torch.Generator().manual_seed(seed)
    H, Hkv, D = SHAPE["heads"], SHAPE["kv_heads"], SHAPE["head_dim"]
    q, k, v = (torch.randn(1, T, h, D, generator=g).to(device).requires_grad_(True) for h in (H, Hkv, Hkv))
    if method == "nsa_stages":
        if torch.device(device).type == "cpu":
            from nsa.ops import cpu_build

            cpu_build.load()
        # each stage once at a short length first (at most T): the first call of the op pays the process's
        # one-time costs (the lazy import behind torch.compiler.disable: ~5 s), which the first
        # stage measured would otherwise carry
        w = (torch.randn(1, min(T, WARM_UP_LEN), h, D, generator=g).to(device) for h in (H, Hkv, Hkv))
        nsa_stages(*w, **NSA_BLOCKS, device=device)
        return {"method": method, "seqlen": T, "stages": nsa_stages(q, k, v, **NSA_BLOCKS, device=device)}
    if method == "nsa" and torch.device(device).type == "cpu":
        from nsa.ops import cpu_build

        cpu_build.load()  # once per process (JIT build check): not part of the op's time
    fwd = (lambda: nsa_forward(q, k, v, **NSA_BLOCKS)) if method == "nsa" else (lambda: sdpa_forward(q, k, v))
    warm_up(method, g, device)

    def fwd_bwd():
        for x in (q, k, v):
            x.grad = None
        fwd().sum().backward()

    return {
        "method": method,
        "seqlen": T,
        "fwd": best_of(fwd, repeats, device),
        "fwd_bwd": best_of(fwd_bwd, repeats, device),
    }


def run_in_subprocess(method: str, T: int, args) -> dict:
    cmd = [sys.executable, "-m", "bench.attention", "--child", method, "--seqlens", str(T)]
    cmd += ["--repeats", "1", "--device", args.device]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        return {"method": method, "seqlen": T, "error": (proc.stderr or proc.stdout)[-2000:]}
    return json.loads(lines[-1])


def best_round(rounds: list[dict]) -> dict:
    """One method's interleaved rounds -> one result: the lowest times, the highest peak memory,
    every round's measurements under ``runs`` (an error if any round failed)."""
    failed = [r for r in rounds if "error" in r]
    if failed:
        return failed[0]
    out = dict(rounds[0])
    if "stages" in out:
        out["stages"] = {name: {ph: min(r["stages"][name][ph] for r in rounds) for ph in ("fwd", "bwd")}
                         for name in out["stages"]}
        return out
    for phase in ("fwd", "fwd_bwd"):
        out[phase] = best([m for r in rounds for m in r[phase]["runs"]])
    return out


def _ratio(a, b):
    return None if a is None or b is None or a == 0 else b / a


def summarize(results: list[dict]) -> list[dict]:
    """One row per length: NSA and SDPA side by side with ``sdpa / nsa`` ratios."""
    rows = []
    for T in sorted({r["seqlen"] for r in results}):
        by = {r["method"]: r for r in results if r["seqlen"] == T and "error" not in r}
        if not {"nsa", "sdpa"} <= set(by):
            continue
        row = {"seqlen": T}
        for phase in ("fwd", "fwd_bwd"):
            n, s = by["nsa"][phase], by["sdpa"][phase]
            for key in ("wall_s", "cpu_s", "peak_mb"):
                row[f"{phase}_{key}_nsa"], row[f"{phase}_{key}_sdpa"] = n[key], s[key]
                row[f"{phase}_{key}_ratio"] = _ratio(n[key], s[key])
        rows.append(row)
    return rows


def print_summary(rows: list[dict], title: str) -> None:
    """Two tables: times (wall, with the CPU-time ratio) and peak memory."""
    phases = (("fwd", "fwd"), ("fwd_bwd", "fwd+bwd"))
    cols = ["T"]
    for _, name in phases:
        cols += [f"{name} NSA s", f"{name} SDPA s", f"{name} speedup", f"{name} CPU-time speedup"]
    table = []
    for r in rows:
        cells = [r["seqlen"]]
        for p, _ in phases:
            cells += [fmt(r[f"{p}_wall_s_nsa"]), fmt(r[f"{p}_wall_s_sdpa"])]
            cells += [fmt(r[f"{p}_wall_s_ratio"]) + "x", fmt(r[f"{p}_cpu_s_ratio"]) + "x"]
        table.append(cells)
    print_table(title + ": time (speedup = SDPA / NSA)", cols, table)
    cols = ["T"]
    for _, name in phases:
        cols += [f"{name} NSA MB", f"{name} SDPA MB", f"{name} SDPA / NSA"]
    table = []
    for r in rows:
        cells = [r["seqlen"]]
        for p, _ in phases:
            cells += [fmt(r[f"{p}_peak_mb_nsa"], ".0f"), fmt(r[f"{p}_peak_mb_sdpa"], ".0f")]
            cells += [fmt(r[f"{p}_peak_mb_ratio"]) + "x"]
        table.append(cells)
    print_table(title + ": peak memory (RSS rise during the call)", cols, table)


def print_stages(results: list[dict], title: str) -> None:
    """Per length and NSA stage: forward, backward and their share of the stages' total."""
    table = []
    for r in sorted((r for r in results if r.get("method") == "nsa_stages" and "error" not in r),
                    key=lambda r: r["seqlen"]):
        total = sum(st["fwd"] + st["bwd"] for st in r["stages"].values())
        for name, st in r["stages"].items():
            share = 100 * (st["fwd"] + st["bwd"]) / total if total else None
            table.append([r["seqlen"], name, fmt(st["fwd"]), fmt(st["bwd"]), fmt(share, ".0f") + "%"])
    if table:
        print_table(title + ": NSA stages, each on its own (s)", ["T", "stage", "fwd", "bwd", "share of fwd+bwd"], table)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--seqlens", type=int, nargs="+", default=[4096, 8192, 16384, 32768])
    p.add_argument("--repeats", type=int, default=1,
                   help="interleaved rounds per length (each method once per round); the best is reported")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--breakdown", action="store_true", help="also time each NSA stage on its own")
    p.add_argument("--out", default=None, help="JSON path (default outputs/bench/attention_<device>.json)")
    p.add_argument("--child", choices=["nsa", "sdpa", "nsa_stages"], help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(T < NSA_BLOCKS["block_len"] for T in args.seqlens):
        p.error(f"--seqlens must be >= block_len ({NSA_BLOCKS['block_len']})")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:  # one measurement, printed as a JSON line for the parent
        print(json.dumps(run_case(args.child, args.seqlens[0], args.repeats, args.device)))
        return 0
    out = Path(args.out or f"outputs/bench/attention_{torch.device(args.device).type}.json")
    results = []
    methods = ("nsa", "sdpa") + (("nsa_stages",) if args.breakdown else ())
    for T in args.seqlens:
        rounds = {m: [] for m in methods}
        for _ in range(args.repeats):  # interleaved: NSA, SDPA, (stages), NSA, SDPA, ...
            for method in methods:
                rounds[method].append(run_in_subprocess(method, T, args))
        for method in methods:
            r = best_round(rounds[method])
            if "error" in r:
                print(f"T={T} {method}: failed\n{r['error']}", file=sys.stderr)
            results.append(r)
        rows = summarize(results)
        payload = {"shape": SHAPE, "nsa": NSA_BLOCKS, "device": args.device, "repeats": args.repeats}
        write_json(out, {**payload, "summary": rows, "results": results})
    from nsa.ops.common import resolve_backend

    backend = resolve_backend(None, torch.zeros(1, device=args.device))
    title = (
        f"NSA ({backend} backend) vs SDPA causal, H={SHAPE['heads']} Hkv={SHAPE['kv_heads']} D={SHAPE['head_dim']}, "
        f"{args.device}, {torch.get_num_threads()} thread(s), best of {args.repeats}"
    )
    print_summary(summarize(results), title)
    print_stages(results, title)
    print(f"wrote {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
