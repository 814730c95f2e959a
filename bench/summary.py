"""Markdown tables for bench/RESULTS.md, rendered from the benchmarks' JSON (never typed by hand).

    python -m bench.summary OUT_DIR [--out OUT_DIR/summary.md]
    python -m bench.summary --cpu-attention RUN.json... [--cpu-decode DECODE.json...]
    python -m bench.summary --ab AB.txt...
    python -m bench.summary --ab-inproc AB.json...

The first form summarises a GPU suite run (bench/gpu_suite.sh): what its stages wrote into
OUT_DIR (env.txt, stages.txt, kernels.json, decode.json, train.json; any may be missing after a
failed stage). The second prints the CPU table of ``bench.attention`` runs (one row per run and
length, labelled by the file name's last dash-separated part: run1, best3, ...) and, with
``--cpu-decode``, the decode table of ``bench.decode`` runs. The third summarises A / B runs of the
CPU op at two commits (bench/ab_cpu_op.sh: one ``SIDE T {JSON}`` line per measurement); the fourth
those of bench.ab_inproc (builds side by side in one process).
"""

from __future__ import annotations

import argparse
import json
import statistics
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


def _decode_cells(r: dict, x: str = "") -> list[str]:
    """A bench.decode result's row: context, full and NSA ms, measured and expected speedup (+ x)."""
    return [str(r["context"]), _f(r.get("full_ms"), ".3f"), _f(r.get("nsa_ms"), ".3f"),
            _f(r.get("measured_x")) + x, _f(r.get("expected_x")) + x]


def decode_section(data: dict) -> list[str]:
    lines = ["## Decode step (one attention layer, ms)", "",
             "| context | full | NSA | measured x | expected x (K/V tokens read) |", "|---|---|---|---|---|"]
    lines += ["| " + " | ".join(_decode_cells(r)) + " |" for r in data.get("results", [])]
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


def _label(path: Path) -> str:
    return path.stem.rsplit("-", 1)[-1]


def cpu_attention_table(paths: list[Path]) -> list[str]:
    """One row per run and length: wall times, ratios (SDPA / NSA) and peak memory."""
    lines = ["| run | T | fwd NSA s | fwd SDPA s | fwd x | f+b NSA s | f+b SDPA s | f+b x | "
             "peak MB fwd NSA / SDPA | peak MB f+b NSA / SDPA |", "|---|---|---|---|---|---|---|---|---|---|"]
    for path in paths:
        for r in json.loads(path.read_text())["summary"]:
            lines.append(
                f"| {_label(path)} | {r['seqlen']} | {_f(r['fwd_wall_s_nsa'])} | {_f(r['fwd_wall_s_sdpa'])} | "
                f"{_f(r['fwd_wall_s_ratio'])} | {_f(r['fwd_bwd_wall_s_nsa'])} | {_f(r['fwd_bwd_wall_s_sdpa'])} | "
                f"{_f(r['fwd_bwd_wall_s_ratio'])} | {_f(r['fwd_peak_mb_nsa'], '.1f')} / {_f(r['fwd_peak_mb_sdpa'], '.1f')} | "
                f"{_f(r['fwd_bwd_peak_mb_nsa'], '.1f')} / {_f(r['fwd_bwd_peak_mb_sdpa'], '.1f')} |")
    return lines + [""]


def ab_table(paths: list[Path]) -> list[str]:
    """Per A / B file, length and side: the rounds, the best and median times, and the lowest and
    highest peak memory (RSS rise; a few hundred KB to 2 MB apart from round to round)."""
    lines = ["| file | T | side | rounds | fwd best / median s | f+b best / median s | peak MB fwd min-max | "
             "peak MB f+b min-max |", "|---|---|---|---|---|---|---|---|"]
    for path in paths:
        rows: dict[tuple[int, str], list[dict]] = {}
        for line in path.read_text().splitlines():
            side, T, js = line.split(" ", 2)
            rows.setdefault((int(T), side), []).append(json.loads(js))
        for (T, side), runs in sorted(rows.items(), key=lambda kv: (kv[0][0], kv[0][1] != "old")):
            cells = []
            for key in ("fwd", "fwd_bwd"):
                w = [r[key]["wall_s"] for r in runs]
                cells.append(f"{min(w):.3f} / {statistics.median(w):.3f}")
            for key in ("fwd", "fwd_bwd"):
                m = [r[key]["peak_mb"] for r in runs if r[key]["peak_mb"] is not None]
                cells.append(f"{min(m):.1f}-{max(m):.1f}" if m else "-")
            lines.append(f"| {path.name} | {T} | {side} | {len(runs)} | " + " | ".join(cells) + " |")
    return lines + [""]


def ab_inproc_table(paths: list[Path]) -> list[str]:
    """bench.ab_inproc runs: one row per build, ratios to each run's first commit."""
    from bench.ab_inproc import COLUMNS, cells

    lines = ["| file | T | rounds | " + " | ".join(COLUMNS) + " |", "|---" * (len(COLUMNS) + 3) + "|"]
    for path in paths:
        data = json.loads(path.read_text())
        lines += [f"| {path.name} | {data['seqlen']} | {data['rounds']} | " + " | ".join(cells(r)) + " |"
                  for r in data["summary"]]
    return lines + [""]


def cpu_decode_table(paths: list[Path]) -> list[str]:
    lines = ["| run | context | full ms | NSA ms | measured | expected (K/V read) |", "|---|---|---|---|---|---|"]
    for path in paths:
        lines += ["| " + " | ".join([_label(path)] + _decode_cells(r, "x")) + " |"
                  for r in json.loads(path.read_text())["results"]]
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
    p.add_argument("out_dir", type=Path, nargs="?")
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--cpu-attention", type=Path, nargs="+", default=None, help="bench.attention JSON files")
    p.add_argument("--cpu-decode", type=Path, nargs="+", default=None, help="bench.decode JSON files")
    p.add_argument("--ab", type=Path, nargs="+", default=None, help="bench/ab_cpu_op.sh outputs")
    p.add_argument("--ab-inproc", type=Path, nargs="+", default=None, help="bench.ab_inproc JSON files")
    args = p.parse_args(argv)
    if args.cpu_attention or args.cpu_decode or args.ab or args.ab_inproc:
        tables = cpu_attention_table(args.cpu_attention) if args.cpu_attention else []
        tables += cpu_decode_table(args.cpu_decode) if args.cpu_decode else []
        tables += ab_inproc_table(args.ab_inproc) if args.ab_inproc else []
        text = "\n".join(tables + (ab_table(args.ab) if args.ab else []))
        print(text)
        if args.out:
            args.out.write_text(text + "\n")
        return
    if args.out_dir is None:
        p.error("give OUT_DIR (a GPU suite run) or --cpu-attention / --cpu-decode / --ab / --ab-inproc")
    text = summarize(args.out_dir)
    print(text)
    out = args.out or args.out_dir / "summary.md"
    out.write_text(text + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
