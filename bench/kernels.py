"""Kernel benchmark: each NSA branch, the selection step and the whole NSA op vs full attention.

    python -m bench.kernels [--seqlens 8192 16384 32768 65536] [--configs paper g4 g8]
                            [--out outputs/bench/kernels.json] [--quick]

CUDA only. For every config and sequence length ``T`` (batch 1) it times forward, backward
and forward+backward (median of many runs with CUDA events after warm-up, through
``triton.testing.do_bench``) of

* ``compressed``, ``selected``, ``window``: one NSA branch each (Triton backend);
* ``select``: block selection from the compressed branch's ``lse`` (forward only);
* ``nsa``: the whole op, compressed -> select_blocks(lse=...) -> selected -> window, summed
  (gates and the compression MLP are elementwise / small and left out, as in the paper);
  ``nsa_branches``: the three branches alone, with the block indices computed beforehand;
* ``full_sdpa_*``: causal attention over all ``T`` keys via ``scaled_dot_product_attention``
  (K/V repeated to ``H`` heads and ``v`` padded to ``Dk``, which the flash/cuDNN backends need),
  and ``full_flash_attn`` when the flash-attn package is installed.

It prints a table with the speedup of each NSA row over the fastest full-attention row and
writes everything as JSON (``--out``), rewritten after each sequence length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Config:
    """Attention shape and NSA settings (paper names)."""

    name: str
    num_heads: int
    num_kv_heads: int
    head_dim_k: int
    head_dim_v: int
    block_len: int
    stride: int
    select_len: int
    num_select: int
    window: int


PAPER = dict(num_kv_heads=4, head_dim_k=192, head_dim_v=128, block_len=32, stride=16, select_len=64,
             num_select=16, window=512)
CONFIGS = {
    "paper": Config("paper", num_heads=64, **PAPER),  # G = 16
    "g4": Config("g4", num_heads=16, **PAPER),
    "g8": Config("g8", num_heads=32, **PAPER),
}
DEFAULT_SEQLENS = [8192, 16384, 32768, 65536, 131072]  # 128k: rows that run out of memory say so
QUICK_SEQLENS = [8192, 65536]


# ----------------------------------------------------------------------------- timing


def time_ms(fn, quick: bool) -> float:
    """Median time of ``fn()`` in ms (CUDA events, after warm-up)."""
    import triton

    return float(triton.testing.do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                                         return_mode="median"))


def measure(make, quick: bool, backward: bool = True) -> dict:
    """fwd / bwd / fwd+bwd ms of ``make() -> (run, leaves)``; ``run()`` returns the output."""
    run, leaves = make()
    out = {"fwd_ms": time_ms(lambda: run(), quick)}
    if backward:
        y = run()
        dy = torch.randn_like(y)

        def zero():
            for x in leaves:
                x.grad = None

        def bwd():
            zero()
            y.backward(dy, retain_graph=True)

        def fwd_bwd():
            zero()
            run().backward(dy)

        out["bwd_ms"] = time_ms(bwd, quick)
        out["fwdbwd_ms"] = time_ms(fwd_bwd, quick)
        del y, dy
    return out


# ----------------------------------------------------------------------------- workloads


def leaves(*shapes, dtype, device):
    g = torch.Generator(device=device).manual_seed(0)
    return [(torch.randn(s, generator=g, device=device, dtype=dtype) * 0.5).requires_grad_() for s in shapes]


def nsa_inputs(cfg: Config, T: int, dtype, device):
    """q, compressed K/V, selected-branch K/V, window K/V (independent, as in the paper)."""
    import nsa

    H, Hkv, Dk, Dv = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v
    Tc = (T - cfg.block_len) // cfg.stride + 1
    q, kc, vc, ks, vs, kw, vw = leaves((1, T, H, Dk), (1, Tc, Hkv, Dk), (1, Tc, Hkv, Dv), (1, T, Hkv, Dk),
                                       (1, T, Hkv, Dv), (1, T, Hkv, Dk), (1, T, Hkv, Dv), dtype=dtype,
                                       device=device)
    with torch.no_grad():
        _, lse = nsa.compressed_attention(q, kc, vc, block_len=cfg.block_len, stride=cfg.stride)
    return dict(q=q, kc=kc, vc=vc, ks=ks, vs=vs, kw=kw, vw=vw, lse=lse)


def nsa_workloads(cfg: Config, x: dict):
    """``name -> make`` for the branches, the selection step and the whole op."""
    import nsa

    sel = dict(block_len=cfg.block_len, stride=cfg.stride, select_len=cfg.select_len, num_select=cfg.num_select)

    def cmp_():
        return nsa.compressed_attention(x["q"], x["kc"], x["vc"], block_len=cfg.block_len, stride=cfg.stride)

    def select_(lse):
        return nsa.select_blocks(x["q"], x["kc"], lse=lse, **sel)

    with torch.no_grad():
        try:
            idx = select_(x["lse"])
        except Exception as e:  # noqa: BLE001  (a broken selection kernel must not hide the other rows)
            print(f"  triton select_blocks failed ({type(e).__name__}); selected uses torch-backend indices")
            idx = nsa.select_blocks(x["q"], x["kc"], lse=x["lse"], backend="torch", **sel)

    def slc_(idx):
        return nsa.selected_attention(x["q"], x["ks"], x["vs"], idx, select_len=cfg.select_len)

    def win_():
        return nsa.sliding_window_attention(x["q"], x["kw"], x["vw"], window=cfg.window)

    def whole():
        o_cmp, lse = cmp_()
        return o_cmp + slc_(select_(lse.detach())) + win_()

    def branches():
        return cmp_()[0] + slc_(idx) + win_()

    all_leaves = [x[k] for k in ("q", "kc", "vc", "ks", "vs", "kw", "vw")]
    return {
        "compressed": (lambda: (lambda: cmp_()[0], [x["q"], x["kc"], x["vc"]]), True),
        "select": (lambda: (lambda: select_(x["lse"]), []), False),
        "selected": (lambda: (lambda: slc_(idx), [x["q"], x["ks"], x["vs"]]), True),
        "window": (lambda: (lambda: win_(), [x["q"], x["kw"], x["vw"]]), True),
        "nsa": (lambda: (whole, all_leaves), True),
        "nsa_branches": (lambda: (branches, all_leaves), True),
    }


def full_workloads(cfg: Config, T: int, dtype, device):
    """``name -> make`` for full causal attention over all ``T`` keys."""
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    H, Dk, Dv = cfg.num_heads, cfg.head_dim_k, cfg.head_dim_v
    out = {}

    def sdpa(backend):
        def make():
            q, k, v = leaves((1, H, T, Dk), (1, H, T, Dk), (1, H, T, Dk), dtype=dtype, device=device)

            def run():
                with sdpa_kernel([backend]):
                    return F.scaled_dot_product_attention(q, k, v, is_causal=True)[..., :Dv]

            return run, [q, k, v]

        return make

    out["full_sdpa_flash"] = (sdpa(SDPBackend.FLASH_ATTENTION), True)
    out["full_sdpa_cudnn"] = (sdpa(SDPBackend.CUDNN_ATTENTION), True)
    try:
        from flash_attn import flash_attn_func
    except ImportError:
        return out

    def make_fa():
        Hkv = cfg.num_kv_heads
        q, k, v = leaves((1, T, H, Dk), (1, T, Hkv, Dk), (1, T, Hkv, Dk), dtype=dtype, device=device)
        return (lambda: flash_attn_func(q, k, v, causal=True)[..., :Dv]), [q, k, v]

    out["full_flash_attn"] = (make_fa, True)
    return out


# ----------------------------------------------------------------------------- driver


def bench_one(cfg: Config, T: int, dtype, device, quick: bool) -> list[dict]:
    rows = []

    def record(name, make, backward):
        torch.cuda.synchronize()
        t0 = time.time()
        try:
            res = measure(make, quick, backward)
        except Exception as e:  # noqa: BLE001  (OOM, no kernel for this SDPA backend, a failing op): keep going
            res = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"}
        torch.cuda.empty_cache()
        rows.append({"config": cfg.name, "T": T, "name": name, **res})
        print(f"  {cfg.name:6s} T={T:6d} {name:16s} {_fmt_row(res)}  ({time.time() - t0:.1f}s)", flush=True)

    for name, (make, backward) in full_workloads(cfg, T, dtype, device).items():
        record(name, make, backward)
    x = nsa_inputs(cfg, T, dtype, device)
    for name, (make, backward) in nsa_workloads(cfg, x).items():
        record(name, make, backward)
    del x
    torch.cuda.empty_cache()
    return rows


def _fmt_row(res: dict) -> str:
    if "error" in res:
        return res["error"]
    return "  ".join(f"{k[:-3]}={res[k]:9.3f}" for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms") if k in res)


def speedups(rows: list[dict]) -> list[dict]:
    """For each (config, T): NSA rows' speedup over the fastest full-attention row, per mode."""
    out = []
    for key in sorted({(r["config"], r["T"]) for r in rows}):
        group = [r for r in rows if (r["config"], r["T"]) == key and "error" not in r]
        full = [r for r in group if r["name"].startswith("full_")]
        for r in group:
            if r["name"].startswith("full_") or r["name"] == "select":
                continue
            s = {"config": key[0], "T": key[1], "name": r["name"]}
            for mode in ("fwd_ms", "bwd_ms", "fwdbwd_ms"):
                ref = [f[mode] for f in full if mode in f]
                if ref and mode in r:
                    s[mode.replace("_ms", "_x")] = min(ref) / r[mode]
            out.append(s)
    return out


def print_table(rows: list[dict]) -> None:
    sp = {(s["config"], s["T"], s["name"]): s for s in speedups(rows)}
    print(f"\n{'config':7s} {'T':>7s} {'name':16s} {'fwd ms':>9s} {'bwd ms':>9s} {'f+b ms':>9s} "
          f"{'fwd x':>7s} {'bwd x':>7s} {'f+b x':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['config']:7s} {r['T']:7d} {r['name']:16s} {r['error'][:60]}")
            continue
        s = sp.get((r["config"], r["T"], r["name"]), {})
        cells = [f"{r[k]:9.3f}" if k in r else f"{'-':>9s}" for k in ("fwd_ms", "bwd_ms", "fwdbwd_ms")]
        cells += [f"{s[k]:7.2f}" if k in s else f"{'':>7s}" for k in ("fwd_x", "bwd_x", "fwdbwd_x")]
        print(f"{r['config']:7s} {r['T']:7d} {r['name']:16s} " + " ".join(cells))


def environment() -> dict:
    import triton

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                check=False).stdout.strip()
    except OSError:
        commit = ""
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gpu": torch.cuda.get_device_name(),
            "torch": torch.__version__, "triton": triton.__version__, "python": platform.python_version(),
            "commit": commit or "unknown"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seqlens", type=int, nargs="+", default=None, help="sequence lengths (default 8k-128k)")
    p.add_argument("--configs", nargs="+", default=None, choices=sorted(CONFIGS), help="default: all")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    p.add_argument("--out", default="outputs/bench/kernels.json", help="JSON output path")
    p.add_argument("--autotune", action="store_true",
                   help="benchmark all tile configs of the compressed/window kernels (NSA_TRITON_AUTOTUNE=1)")
    p.add_argument("--quick", action="store_true", help=f"short run: {QUICK_SEQLENS}, paper config, fewer reps")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench.kernels needs a CUDA GPU (the Triton kernels are timed on the device); "
              "on CPU run the kernel tests instead: pytest tests/nsa/triton", file=sys.stderr)
        return 2
    if args.autotune:
        os.environ["NSA_TRITON_AUTOTUNE"] = "1"
    seqlens = args.seqlens or (QUICK_SEQLENS if args.quick else DEFAULT_SEQLENS)
    configs = [CONFIGS[c] for c in (args.configs or (["paper"] if args.quick else list(CONFIGS)))]
    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    out_path = Path(args.out)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    meta = {**environment(), "dtype": args.dtype, "autotune": args.autotune, "batch": 1, "configs": [asdict(c) for c in configs],
            "timing": "median ms, triton.testing.do_bench (CUDA events) after warm-up"}
    print(json.dumps(meta))
    rows: list[dict] = []
    for T in seqlens:
        for cfg in configs:
            rows += bench_one(cfg, T, dtype, device, args.quick)
        out_path.write_text(json.dumps({"meta": meta, "results": rows, "speedups": speedups(rows)}, indent=1))
    print_table(rows)
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
