"""One markdown summary of a GPU suite run (bench/gpu_suite.sh), ready for bench/RESULTS.md.

    python -m bench.summary OUT_DIR [--out OUT_DIR/summary.md]

Reads what the suite's stages wrote into OUT_DIR (env.txt, stages.txt, kernels.json,
decode.json, train.json; any may be missing after a failed stage) and prints the tables.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _load(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _f(v, spec=".2f") -> str:
    return "-" if v is None else format(v, spec)


def kernels_section(data: dict) -> list[str]:
    sp = {(s["config"], s["T"], s["name"]): s for s in data.get("speedups", [])}
    lines = ["## Kernels (ms, median; speedup over the fastest full-attention row)", "",
             "| config | T | op | fwd | bwd | fwd+bwd | fwd x | bwd x | fwd+bwd x |", "|---|---|---|---|---|---|---|---|---|"]
    for r in data.get("results", []):
        if "error" in r:
            lines.append(f"| {r['config']} | {r['T']} | {r['name']} | error: {r['error'][:60]} | | | | | |")
            continue
        s = sp.get((r["config"], r["T"], r["name"]), {})
        lines.append(f"| {r['config']} | {r['T']} | {r['name']} | {_f(r.get('fwd_ms'), '.3f')} | "
                     f"{_f(r.get('bwd_ms'), '.3f')} | {_f(r.get('fwdbwd_ms'), '.3f')} | {_f(s.get('fwd_x'))} | "
                     f"{_f(s.get('bwd_x'))} | {_f(s.get('fwdbwd_x'))} |")
    return lines + [""]


def decode_section(data: dict) -> list[str]:
    lines = ["## Decode step (one attention layer, ms)", "",
             "| context | full | NSA | measured x | expected x (K/V tokens read) |", "|---|---|---|---|---|"]
    for r in data.get("results", []):
        lines.append(f"| {r['context']} | {_f(r.get('full_ms'), '.3f')} | {_f(r.get('nsa_ms'), '.3f')} | "
                     f"{_f(r.get('measured_x'))} | {_f(r.get('expected_x'))} |")
    return lines + [""]


def train_section(data: dict) -> list[str]:
    lines = [f"## Training throughput ({data.get('device', '?')})", "",
             "| model | attention | seq_len | step s | tokens/s | MFU | max mem GiB | NSA / full |",
             "|---|---|---|---|---|---|---|---|"]
    for r in data.get("rows", []):
        if "error" in r:
            lines.append(f"| {r['model']} | {r['attention']} | {r['seq_len']} | error: {r['error'][:60]} | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['attention']} | {r['seq_len']} | {_f(r['step_s'], '.3f')} | "
                     f"{_f(r['tokens_per_sec'], '.0f')} | {_f(r.get('mfu'), '.3f')} | {_f(r.get('max_mem_gib'), '.1f')} | "
                     f"{_f(r.get('speedup_vs_full'))} |")
    return lines + [""]


def summarize(out_dir: Path) -> str:
    lines = ["# GPU suite summary", ""]
    env = out_dir / "env.txt"
    if env.exists():
        lines += ["```", env.read_text().strip(), "```", ""]
    stages = out_dir / "stages.txt"
    if stages.exists():
        lines += ["| stage | exit code | seconds |", "|---|---|---|"]
        lines += [f"| {' | '.join(line.split())} |" for line in stages.read_text().splitlines() if line.strip()]
        lines.append("")
    for name, section in (("kernels.json", kernels_section), ("decode.json", decode_section),
                          ("train.json", train_section)):
        data = _load(out_dir / name)
        lines += section(data) if data else [f"({name}: missing: that stage failed or did not run)", ""]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out_dir", type=Path)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    text = summarize(args.out_dir)
    print(text)
    out = args.out or args.out_dir / "summary.md"
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
