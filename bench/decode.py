"""Decode benchmark: time of one decode step of full vs NSA attention at several context lengths.

    python -m bench.decode [--device cpu|cuda] [--contexts ...] [--batch B] [--steps N]
                           [--preset paper|small] [--backend torch|triton] [--out outputs/bench/decode.json]

One attention layer of each kind (the model's ``FullAttention`` and ``nsa.layer.NSAAttention``,
same shapes), a cache holding ``s - 1`` tokens, then the step for token ``s`` is timed (median
of ``--steps`` steps after warm-up; CUDA-synchronised on GPU). The full cache is filled with
random K/V directly (its content does not change the work); the NSA cache is prefilled
through the layer (kernel path), so its compressed entries are real.

Next to the measured ratio ``full_ms / nsa_ms`` it prints the expected ratio from the K/V
tokens each step reads (``nsa.cache.kv_tokens_read``: ``s`` for full attention, compressed +
selected + window for NSA; exact counts) and the paper's Table 4 value (compressed count
rounded to ``s/d``: 4x, 6.4x, 9.1x, 11.6x at 8k..64k). Decode is memory-bound, so the
expected ratio is an upper bound that the measured one approaches when K/V traffic
dominates (large batch, long context); at batch 1 fixed per-step costs (projections,
kernel launches, per-op dispatch) weigh more. On CPU float32 NSA's step runs on the fused op
``nsa.ops.decode_cpu`` (``NSA_DECODE_KERNEL=0``: the torch path); ``meta.nsa_decode`` says which.

Defaults: CPU, the ``small`` preset (NSA l=16, d=8, l'=32, n=4, w=128; 8 heads, 2 KV heads,
D=64) at 1k/2k/4k; CUDA, the ``paper`` preset (64 heads, 4 KV heads, Dk=192, Dv=128, l=32,
d=16, l'=64, n=16, w=512) in bf16 at 8k..64k with batch 8.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from nsa.cache import kv_tokens_read
from nsa.layer import NSAAttention, NSAConfig
from nsa.ops import decode_cpu
from train.model.attention import FullAttention
from train.model.rope import RotaryEmbedding

PRESETS = {
    "paper": dict(hidden_size=2560, num_heads=64, num_kv_heads=4, head_dim_k=192, head_dim_v=128, block_len=32,
                  stride=16, select_len=64, num_select=16, num_init=1, num_local=2, window=512),
    "small": dict(hidden_size=512, num_heads=8, num_kv_heads=2, head_dim_k=64, head_dim_v=64, block_len=16,
                  stride=8, select_len=32, num_select=4, num_init=1, num_local=2, window=128),
}
DEFAULTS = {"cpu": dict(preset="small", contexts=[1024, 2048, 4096], batch=1, dtype="float32", steps=10),
            "cuda": dict(preset="paper", contexts=[8192, 16384, 32768, 65536], batch=8, dtype="bfloat16",
                         steps=50)}


def expected_ratio(s: int, cfg: dict, paper_rounding: bool = False) -> float:
    """``s`` K/V tokens read by full attention over NSA's count at context ``s``. With
    ``paper_rounding`` the compressed count is ``s/d`` as in the paper's Table 4."""
    counts = kv_tokens_read(s, block_len=cfg["block_len"], stride=cfg["stride"], select_len=cfg["select_len"],
                            num_select=cfg["num_select"], window=cfg["window"])
    if paper_rounding:
        counts["total"] += s // cfg["stride"] - counts["compressed"]
    return s / counts["total"]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(layer, cache, x, cos, sin, steps: int, device) -> float:
    """Median ms of ``steps`` one-token decode steps (after 3 warm-up steps)."""
    times = []
    with torch.no_grad():
        for i in range(steps + 3):
            _sync(device)
            t0 = time.perf_counter()
            layer(x, cos, sin, cache=cache)
            _sync(device)
            if i >= 3:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def bench_context(s: int, cfg: dict, batch: int, steps: int, dtype, device, backend: str | None = None) -> dict:
    torch.manual_seed(0)
    C = cfg["hidden_size"]
    nsa_cfg = NSAConfig(**cfg, backend=backend)
    full = FullAttention(C, cfg["num_heads"], cfg["num_kv_heads"], cfg["head_dim_k"], cfg["head_dim_v"])
    full, nsa = full.to(device, dtype).eval(), NSAAttention(nsa_cfg).to(device, dtype).eval()
    rope = RotaryEmbedding(cfg["head_dim_k"]).to(device)
    max_len = s + steps + 4
    x = torch.randn(batch, 1, C, device=device, dtype=dtype)
    cos, sin = rope(torch.full((batch, 1), s - 1, device=device))

    full_cache = full.new_cache(batch, max_len, device, dtype)
    full_cache.k[:, :s - 1].normal_()
    full_cache.v[:, :s - 1].normal_()
    full_cache.length = s - 1
    full_ms = time_steps(full, full_cache, x, cos, sin, steps, device)
    del full_cache

    nsa_cache = nsa.new_cache(batch, max_len, device, dtype)
    with torch.no_grad():
        ctx = torch.randn(batch, s - 1, C, device=device, dtype=dtype)
        pc, ps = rope(torch.arange(s - 1, device=device).expand(batch, s - 1))
        nsa(ctx, pc, ps, cache=nsa_cache)
        del ctx, pc, ps
    nsa_ms = time_steps(nsa, nsa_cache, x, cos, sin, steps, device)
    del nsa_cache
    if device.type == "cuda":
        torch.cuda.empty_cache()
    reads = kv_tokens_read(s, block_len=cfg["block_len"], stride=cfg["stride"], select_len=cfg["select_len"],
                           num_select=cfg["num_select"], window=cfg["window"])
    return {"context": s, "full_ms": full_ms, "nsa_ms": nsa_ms, "measured_x": full_ms / nsa_ms,
            "expected_x": expected_ratio(s, cfg), "paper_x": expected_ratio(s, cfg, paper_rounding=True),
            "kv_tokens_full": s, "kv_tokens_nsa": reads}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'context':>8s} {'full ms':>9s} {'nsa ms':>9s} {'measured':>9s} {'expected':>9s} {'paper':>7s} "
          f"{'kv full':>8s} {'kv nsa':>7s}")
    for r in rows:
        print(f"{r['context']:8d} {r['full_ms']:9.3f} {r['nsa_ms']:9.3f} {r['measured_x']:8.2f}x "
              f"{r['expected_x']:8.2f}x {r['paper_x']:6.2f}x {r['kv_tokens_full']:8d} "
              f"{r['kv_tokens_nsa']['total']:7d}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--contexts", type=int, nargs="+", default=None, help="context lengths s (tokens)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="layer shape and NSA settings")
    p.add_argument("--batch", type=int, default=None, help="rows decoded together")
    p.add_argument("--steps", type=int, default=None, help="timed steps per context (median)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--backend", default=None, choices=["torch", "triton"],
                   help="NSA backend of the prefill (the timed decode steps do not use it); "
                        "default: the nsa default for the device")
    p.add_argument("--out", default="outputs/bench/decode.json", help="JSON output path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.decode: --device cuda but no CUDA GPU is available")
    d = DEFAULTS[args.device]
    preset = args.preset or d["preset"]
    cfg = PRESETS[preset]
    contexts = args.contexts or d["contexts"]
    batch, steps = args.batch or d["batch"], args.steps or d["steps"]
    dtype_name = args.dtype or d["dtype"]
    if min(contexts) < 2 or batch < 1 or steps < 1:
        raise SystemExit("bench.decode: contexts must be >= 2, batch and steps >= 1")
    device = torch.device(args.device)
    kernel = decode_cpu.applies(device, getattr(torch, dtype_name))
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": args.device,
            "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
            "torch": torch.__version__, "preset": preset, "layer": cfg, "batch": batch, "steps": steps,
            "dtype": dtype_name, "backend": args.backend,
            "nsa_decode": "cpu kernel (nsa.ops.decode_cpu)" if kernel else "torch (nsa.cache.decode_token)",
            "timing": "median ms of one-token decode steps of one attention layer"}
    print(json.dumps(meta))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in contexts:
        rows.append(bench_context(s, cfg, batch, steps, getattr(torch, dtype_name), device, args.backend))
        r = rows[-1]
        print(f"  s={s:6d} full {r['full_ms']:.3f} ms  nsa {r['nsa_ms']:.3f} ms  "
              f"measured {r['measured_x']:.2f}x  expected {r['expected_x']:.2f}x", flush=True)
        out.write_text(json.dumps({"meta": meta, "results": rows}, indent=1))
    print_table(rows)
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
