"""Training throughput of one model with NSA and with full attention, side by side.

    python -m bench.train_throughput [--model 1b] [--seqlens 8192 32768] [--steps 8]
                                     [--micro-batch 1] [--out outputs/bench/train_throughput.json]

For each context length it builds the model twice from ``configs/model/<model>.yaml`` with
``configs/attention/full.yaml`` and ``configs/attention/nsa.yaml`` (same seed, same random
token batch), runs ``--warmup`` then ``--steps`` optimizer steps (bf16 autocast, fp32 master
weights, fused AdamW, activation checkpointing per block) and reports the median step time,
tokens/s, MFU (model FLOPs per token from ``train.model.flops`` over the device's peak from
``train.metrics``) and peak memory; NSA's speedup is the ratio of the two tokens/s measured
in this one run. This is the model-side cost only (no DeepSpeed, no data loader), so that it
runs on a bare CUDA image.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch
import yaml

from train.metrics import peak_flops
from train.model import AttentionConfig, ModelConfig, build_model, count_parameters
from train.model.flops import flops_per_token

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def load_configs(model: str, attention: str, seq_len: int) -> tuple[ModelConfig, AttentionConfig]:
    mcfg = ModelConfig.from_dict(yaml.safe_load((CONFIGS / "model" / f"{model}.yaml").read_text()))
    mcfg.max_seq_len = max(mcfg.max_seq_len, seq_len)
    acfg = AttentionConfig.from_dict(yaml.safe_load((CONFIGS / "attention" / f"{attention}.yaml").read_text()))
    mcfg.validate()
    acfg.validate()
    return mcfg, acfg


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def measure(model: str, attention: str, seq_len: int, args) -> dict:
    """Median optimizer-step time of one (model, attention, seq_len) on ``args.device``."""
    dev = args.device
    mcfg, acfg = load_configs(model, attention, seq_len)
    torch.manual_seed(0)
    net = build_model(mcfg, acfg).to(dev)
    net.set_gradient_checkpointing(args.checkpointing)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4, fused=dev == "cuda")
    gen = torch.Generator(device=dev).manual_seed(1)
    ids = torch.randint(0, mcfg.vocab_size, (args.micro_batch, seq_len + 1), device=dev, generator=gen)
    inputs, labels = ids[:, :-1], ids[:, 1:]
    if dev == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(args.warmup + args.steps):
        _sync(dev)
        t0 = time.perf_counter()
        with torch.autocast(dev, dtype=torch.bfloat16, enabled=dev == "cuda"):
            out = net(inputs, labels=labels)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        _sync(dev)
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    step = statistics.median(times)
    tokens = args.micro_batch * seq_len
    tps = tokens / step
    fpt = flops_per_token(mcfg, acfg, seq_len)["total"]  # fwd + bwd
    peak = peak_flops(dev, "bf16")
    row = {
        "model": model, "attention": acfg.kind, "seq_len": seq_len, "micro_batch": args.micro_batch,
        "params": count_parameters(net)["total"], "step_s": step, "tokens_per_sec": tps,
        "flops_per_token": fpt, "mfu": (fpt * tps / peak) if peak else None,
        "max_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev == "cuda" else None,
        "loss": out.loss.item(),
    }
    del net, opt, out
    gc.collect()
    if dev == "cuda":
        torch.cuda.empty_cache()
    return row


def write_json(path: str, obj: dict) -> None:
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(obj, indent=1))


def print_table(title: str, rows: list[dict], cols: list[str]) -> None:
    def fmt(v):
        return "-" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    cells = [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print(title)
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="1b")
    p.add_argument("--seqlens", type=int, nargs="+", default=[8192, 32768])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--no-checkpointing", dest="checkpointing", action="store_false")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of the same code (fp32, e.g. --model tiny --seqlens 512)")
    p.add_argument("--out", default="outputs/bench/train_throughput.json")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: use --device cpu for a dry run (e.g. --model tiny --seqlens 512)")
    rows = []
    for seq_len in args.seqlens:
        pair = {}
        for attention in ("full", "nsa"):
            try:
                pair[attention] = measure(args.model, attention, seq_len, args)
            except torch.cuda.OutOfMemoryError as err:  # report, keep the other rows
                pair[attention] = {"model": args.model, "attention": attention, "seq_len": seq_len,
                                   "error": f"OOM: {err}".splitlines()[0]}
                torch.cuda.empty_cache()
            rows.append(pair[attention])
        if "tokens_per_sec" in pair["full"] and "tokens_per_sec" in pair["nsa"]:
            pair["nsa"]["speedup_vs_full"] = pair["nsa"]["tokens_per_sec"] / pair["full"]["tokens_per_sec"]
        name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
        write_json(args.out, {"device": name, "rows": rows})
    cols = ["model", "attention", "seq_len", "step_s", "tokens_per_sec", "mfu", "max_mem_gib", "speedup_vs_full"]
    print_table(f"Training throughput on {args.device} (AdamW; bf16 autocast on CUDA)", rows, cols)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
