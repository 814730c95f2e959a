"""Side-by-side report of runs and their evaluations (NSA vs full attention).

    python -m eval.compare outputs/runs/exp-nsa outputs/runs/exp-full --out outputs/compare/exp
    python -m eval.compare outputs/eval/exp-nsa outputs/eval/exp-full --out DIR [--wandb-report --entity E]
    python -m eval.compare RUN... --out DIR --summary DIR/summary.json   # also the machine-readable summary

Each argument is a run dir (``metrics.jsonl``, ``export/``; its evaluations are looked
up in ``<eval-root>/<run name>/``) or an eval dir (``<task>/results.json``; its run
is the ``run_dir`` recorded there). Writes ``report.md`` plus PNG figures in ``--out``:
a plain-words verdict (what NSA won, lost and tied against full attention), a summary
with throughput, loss curves, held-out loss by position, NIAH heatmaps
next to each other, LongBench / MMLU / lm-eval tables. ``--wandb-report`` also builds
a wandb-workspaces report for the runs' group (saved only with ``--publish``).
"""

from __future__ import annotations

import argparse
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from eval.io import markdown_table, read_jsonl

TASK_NAMES = ("niah", "longbench", "mmlu", "ppl", "general", "retrieval")


@dataclass
class Entry:
    """One compared model: its run logs and its evaluation results by task."""

    name: str
    run_dir: Path | None
    eval_dir: Path | None
    metrics: list[dict] = field(default_factory=list)
    results: dict[str, dict] = field(default_factory=dict)  # task -> results.json document
    attention: str | None = None


def load_entry(path: str | Path, eval_root: str | Path = "outputs/eval") -> Entry:
    """Entry from a run dir or an eval dir (see module docstring)."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{str(path)!r} is not a directory")
    if (path / "metrics.jsonl").is_file() or (path / "export").is_dir():
        run_dir, eval_dir = path, Path(eval_root) / path.name
        eval_dir = eval_dir if eval_dir.is_dir() else None
    elif any((path / t / "results.json").is_file() for t in TASK_NAMES):
        run_dir, eval_dir = None, path
    else:
        raise ValueError(f"{str(path)!r} is neither a run dir (metrics.jsonl / export/) nor an eval dir "
                         f"(<task>/results.json for a task in {TASK_NAMES})")
    results = {}
    if eval_dir is not None:
        for task in TASK_NAMES:
            f = eval_dir / task / "results.json"
            if f.is_file():
                results[task] = json.loads(f.read_text())
    if run_dir is None:
        recorded = next((d["run_dir"] for d in results.values() if d.get("run_dir")), None)
        run_dir = Path(recorded) if recorded and Path(recorded).is_dir() else None
    entry = Entry(name=path.name, run_dir=run_dir, eval_dir=eval_dir, results=results)
    if run_dir is not None and (run_dir / "metrics.jsonl").is_file():
        entry.metrics = read_jsonl(run_dir / "metrics.jsonl")
    entry.attention = next((d.get("attention") for d in results.values() if d.get("attention")), None)
    if entry.attention is None and run_dir is not None and (run_dir / "config.yaml").is_file():
        from omegaconf import OmegaConf

        entry.attention = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "attention.kind", default=None)
    return entry


def series(metrics: list[dict], key: str) -> tuple[list[float], list[float]]:
    """(steps, values) of one metric over the rows that have it."""
    rows = [r for r in metrics if isinstance(r.get(key), (int, float))]
    return [r.get("step", i) for i, r in enumerate(rows)], [float(r[key]) for r in rows]


def throughput(metrics: list[dict], key: str = "perf/tokens_per_sec") -> dict:
    """Median tokens/s over the second half of the logged steps (skips compile / warm-up), and the mean."""
    _, vals = series(metrics, key)
    if not vals:
        return {"median": None, "mean": None}
    tail = vals[len(vals) // 2:]
    return {"median": statistics.median(tail), "mean": sum(vals) / len(vals)}


def _last(metrics: list[dict], key: str):
    _, vals = series(metrics, key)
    return vals[-1] if vals else None


def summary_section(entries: list[Entry]) -> str:
    rows = []
    for e in entries:
        tp = throughput(e.metrics)
        steps, _ = series(e.metrics, "train/loss")
        rows.append([e.name, e.attention or "-", int(steps[-1]) if steps else None, _last(e.metrics, "train/loss"),
                     _last(e.metrics, "val/loss"), tp["median"], tp["mean"]])
    return "## Runs\n\n" + markdown_table(
        ["run", "attention", "steps", "final train loss", "final val loss", "tokens/s (median, 2nd half)",
         "tokens/s (mean)"], rows, 4)


def curves_section(entries: list[Entry], out: Path) -> str:
    from eval.plots import line_plot

    text = ""
    for key, fname, label in (("train/loss", "train_loss.png", "train loss"), ("val/loss", "val_loss.png", "validation loss"),
                              ("perf/tokens_per_sec", "throughput.png", "tokens / s")):
        data = {e.name: series(e.metrics, key) for e in entries if series(e.metrics, key)[0]}
        if data:
            line_plot(data, out / fname, "step", label, label)
            text += f"![{label}]({fname})\n\n"
    return "## Training curves\n\n" + text if text else ""


def ppl_section(entries: list[Entry], out: Path) -> str:
    from eval.plots import line_plot

    have = [e for e in entries if "ppl" in e.results]
    if not have:
        return ""
    lengths = sorted({int(L) for e in have for L in e.results["ppl"]["results"]["lengths"]})
    rows = []
    for e in have:
        res = e.results["ppl"]["results"]["lengths"]
        rows.append([e.name] + [res.get(str(L), {}).get("ppl") for L in lengths])
    data = {}
    for e in have:
        for L, r in e.results["ppl"]["results"]["lengths"].items():
            if r["buckets"]:
                data[f"{e.name} L={L}"] = ([(b["start"] + b["end"]) / 2 for b in r["buckets"]], [b["loss"] for b in r["buckets"]])
    line_plot(data, out / "loss_by_position.png", "position", "held-out loss (nats)", "loss by position")
    return ("## Held-out perplexity\n\n" + markdown_table(["run"] + [f"ppl @ {L}" for L in lengths], rows, 3)
            + "\n![loss by position](loss_by_position.png)\n\n")


def niah_section(entries: list[Entry], out: Path) -> str:
    from eval.plots import niah_heatmaps_side_by_side

    have = [e for e in entries if "niah" in e.results]
    if not have:
        return ""
    panels = {e.name: e.results["niah"]["results"] for e in have}
    niah_heatmaps_side_by_side(panels, out / "niah_heatmaps.png")
    lengths = sorted({int(L) for r in panels.values() for L in r["per_length"]})
    rows = [[n, r["needle"]] + [r["per_length"].get(str(L)) for L in lengths] + [r["overall"], r["overall_exact"]]
            for n, r in panels.items()]
    return ("## Needle in a haystack\n\n![NIAH heatmaps](niah_heatmaps.png)\n\n"
            + markdown_table(["run", "needle"] + [f"{L}" for L in lengths] + ["overall", "exact"], rows, 3) + "\n")


def longbench_section(entries: list[Entry], out: Path) -> str:
    from eval.plots import grouped_bars

    have = [e for e in entries if "longbench" in e.results]
    if not have:
        return ""
    tasks = list(dict.fromkeys(t for e in have for t in e.results["longbench"]["results"]["tasks"]))
    cats = list(dict.fromkeys(c for e in have for c in e.results["longbench"]["results"]["categories"]))
    rows = [[t] + [e.results["longbench"]["results"]["tasks"].get(t, {}).get("score") for e in have] for t in tasks]
    rows += [[f"**{c}**"] + [e.results["longbench"]["results"]["categories"].get(c) for e in have] for c in cats]
    rows.append(["**average**"] + [e.results["longbench"]["results"]["average"] for e in have])
    grouped_bars(cats, {e.name: [e.results["longbench"]["results"]["categories"].get(c) for c in cats] for e in have},
                 out / "longbench_categories.png", "score (x100)", "LongBench by category")
    text = ("## LongBench\n\n" + markdown_table(["task"] + [e.name for e in have], rows, 2)
            + "\n![LongBench](longbench_categories.png)\n\n")
    return text + longbench_e_table(have)


def longbench_e_table(entries: list[Entry]) -> str:
    """LongBench-E: mean task score per length bucket for each run (runs without buckets skipped)."""
    means: dict[str, dict[str, float]] = {}
    for e in entries:
        per_bucket: dict[str, list[float]] = {}
        for v in e.results["longbench"]["results"]["tasks"].values():
            for b, score in (v.get("buckets") or {}).items():
                if score is not None:
                    per_bucket.setdefault(b, []).append(score)
        if per_bucket:
            means[e.name] = {b: sum(x) / len(x) for b, x in per_bucket.items()}
    if not means:
        return ""
    buckets = list(dict.fromkeys(b for m in means.values() for b in m))
    rows = [[name] + [m.get(b) for b in buckets] for name, m in means.items()]
    return "### LongBench-E by context length (words)\n\n" + markdown_table(["run"] + buckets, rows, 2) + "\n"


def mmlu_section(entries: list[Entry]) -> str:
    have = [e for e in entries if "mmlu" in e.results]
    if not have:
        return ""
    cats = list(dict.fromkeys(c for e in have for c in e.results["mmlu"]["results"]["categories"]))
    rows = [[c] + [100 * e.results["mmlu"]["results"]["categories"].get(c, {}).get("acc", float("nan")) for e in have]
            for c in cats]
    rows.append(["**micro average**"] + [100 * e.results["mmlu"]["results"]["micro_avg"] for e in have])
    rows.append(["**macro average**"] + [100 * e.results["mmlu"]["results"]["macro_avg"] for e in have])
    return "## MMLU (accuracy %)\n\n" + markdown_table(["category"] + [e.name for e in have], rows, 2) + "\n"


def general_section(entries: list[Entry]) -> str:
    have = [e for e in entries if "general" in e.results]
    if not have:
        return ""
    values: dict[tuple, dict[str, float]] = {}
    for e in have:
        for name, entry in e.results["general"]["results"].items():
            for task, metrics in entry["results"].items():
                for k, v in metrics.items():
                    if isinstance(v, (int, float)) and "stderr" not in k:
                        values.setdefault((name, task, k), {})[e.name] = v
    rows = [list(key) + [vals.get(e.name) for e in have] for key, vals in values.items()]
    return "## General benchmarks (lm-eval)\n\n" + markdown_table(
        ["suite task", "lm-eval task", "metric"] + [e.name for e in have], rows, 4) + "\n"


def retrieval_section(entries: list[Entry]) -> str:
    have = [e for e in entries if "retrieval" in e.results]
    if not have:
        return ""
    tasks = list(dict.fromkeys(t for e in have for t in e.results["retrieval"]["results"]))
    rows = []
    for e in have:
        res = e.results["retrieval"]["results"]
        rows.append([e.name] + [f"{res[t]['exact']:.3f} ({res[t]['token_acc']:.3f})" if t in res else None for t in tasks])
    first = have[0].results["retrieval"]["results"]
    if all("lookup_exact" in first.get(t, {}) for t in tasks):
        rows.append(["*ideal one-token look-up*"] + [f"{first[t]['lookup_exact']:.3f} ({first[t]['lookup_token_acc']:.3f})"
                                                     for t in tasks])
    return ("## Retrieval on held-out synthetic documents\n\nAnswers retrieved exactly (answer tokens right), "
            "teacher-forced (`python -m eval task=retrieval`). The last row is what a perfect one-token "
            "look-up (an ideal induction head) scores on the same documents.\n\n"
            + markdown_table(["run"] + tasks, rows, 3) + "\n")


def short_name(entry: Entry, entries: list[Entry]) -> str:
    """The run's name without the experiment prefix all runs share ("demo-nsa" -> "nsa")."""
    prefixes = {e.name.split("-", 1)[0] for e in entries if "-" in e.name}
    if len(prefixes) == 1 and all("-" in e.name for e in entries):
        return entry.name.split("-", 1)[1]
    return entry.name


def stages(run_dir: Path | None) -> list[dict]:
    """The training stages that made a run, first to last: ``{"run": dir name, "steps": int}`` for the
    run and, through each config's ``train.init_from``, every run it started from (a curriculum)."""
    out, seen = [], set()
    while run_dir is not None and (run_dir / "metrics.jsonl").is_file() and run_dir.resolve() not in seen:
        seen.add(run_dir.resolve())
        steps, _ = series(read_jsonl(run_dir / "metrics.jsonl"), "train/loss")
        out.insert(0, {"run": run_dir.name, "steps": int(steps[-1]) if steps else 0})
        init = None
        if (run_dir / "config.yaml").is_file():
            from omegaconf import OmegaConf

            init = OmegaConf.select(OmegaConf.load(run_dir / "config.yaml"), "train.init_from", default=None)
        run_dir = Path(init) if init else None
        if run_dir is not None and run_dir.name == "export":
            run_dir = run_dir.parent
    return out


def summary(entries: list[Entry]) -> dict:
    """Machine-readable results: per run (short name) its final validation loss, steps trained (over all
    its stages, see :func:`stages`) and, per retrieval task, the exact-answer and per-token accuracy;
    plus the commit the runs were trained at (their ``git_commit.txt``; several, comma-separated)."""
    runs, commits = {}, []
    for e in entries:
        steps, _ = series(e.metrics, "train/loss")
        run = {"attention": e.attention, "val_loss": _last(e.metrics, "val/loss"),
               "steps": int(steps[-1]) if steps else None}
        chain = stages(e.run_dir)
        if len(chain) > 1:
            run["stages"] = chain
            run["steps"] = sum(c["steps"] for c in chain)
        if "retrieval" in e.results:
            run["retrieval"] = {t: {"exact": r["exact"], "per_token": r["token_acc"], "answers": r["answers"]}
                                for t, r in e.results["retrieval"]["results"].items()}
        if "niah" in e.results:
            run["niah"] = {"overall": e.results["niah"]["results"]["overall"],
                           "overall_exact": e.results["niah"]["results"]["overall_exact"]}
        runs[short_name(e, entries)] = run
        f = e.run_dir / "git_commit.txt" if e.run_dir is not None else None
        commit = f.read_text().strip() if f is not None and f.is_file() else "unknown"
        if commit not in commits:
            commits.append(commit)
    return {"runs": runs, "commit": ",".join(commits)}


def _verdict_rows(nsa: dict, full: dict) -> list[tuple[str, str, str]]:
    """(measure, NSA vs full, outcome) for every measure both runs have."""
    rows = []

    def compare(label, a, b, higher_better, tie, fmt="{:.3f}"):
        if a is None or b is None:
            return
        d = (a - b) if higher_better else (b - a)
        outcome = "tied" if abs(a - b) <= tie else ("NSA won" if d > 0 else "NSA lost")
        rows.append((label, f"{fmt.format(a)} vs {fmt.format(b)}", outcome))

    compare("final validation loss (lower is better)", nsa.get("val_loss"), full.get("val_loss"), False,
            0.01 * abs(full.get("val_loss") or 0), "{:.4f}")
    for task in full.get("retrieval", {}):
        if task in nsa.get("retrieval", {}):
            compare(f"{task} retrieval, exact answers", nsa["retrieval"][task]["exact"],
                    full["retrieval"][task]["exact"], True, 0.05)
    if "niah" in nsa and "niah" in full:
        compare("needle in a haystack, mean score", nsa["niah"]["overall"], full["niah"]["overall"], True, 0.05)
    if nsa.get("tokens_per_sec") and full.get("tokens_per_sec"):
        compare("training speed (tokens/s)", nsa["tokens_per_sec"], full["tokens_per_sec"], True,
                0.05 * full["tokens_per_sec"], "{:.0f}")
    return rows


def experiment_of(entry: Entry) -> str:
    """The experiment a run belongs to: its name before the first "-" ("demo_retrieval-nsa" ->
    "demo_retrieval"), or the whole name."""
    return entry.name.split("-", 1)[0]


def nsa_full_pairs(entries: list[Entry]) -> list[tuple[Entry, Entry]]:
    """``(nsa, full)`` per experiment (see :func:`experiment_of`) holding both, in the order of the
    entries; the NSA run is the first one that is not an ablation (``window_only`` in its name).
    When no experiment holds both, all entries count as one experiment."""
    groups: dict[str, list[Entry]] = {}
    for e in entries:
        groups.setdefault(experiment_of(e), []).append(e)

    def pair(group):
        nsas = [e for e in group if e.attention == "nsa"]
        nsa = next((e for e in nsas if "window_only" not in e.name), nsas[0] if nsas else None)
        full = next((e for e in group if e.attention == "full"), None)
        return None if nsa is None or full is None else (nsa, full)

    pairs = [p for p in map(pair, groups.values()) if p is not None]
    return pairs or [p for p in [pair(entries)] if p is not None]


def _verdict(nsa: Entry, full: Entry) -> list[tuple[str, str, str]]:
    s = summary([nsa, full])["runs"]
    a, b = s[short_name(nsa, [nsa, full])], s[short_name(full, [nsa, full])]
    a["tokens_per_sec"], b["tokens_per_sec"] = throughput(nsa.metrics)["median"], throughput(full.metrics)["median"]
    return _verdict_rows(a, b)


def _verdict_words(rows: list[tuple[str, str, str]]) -> list[str]:
    by = {k: [m for m, _, o in rows if o == k] for k in ("NSA won", "NSA lost", "tied")}
    words = {"NSA won": "won", "NSA lost": "lost", "tied": "tied"}
    return [f"**{words[k]}**: " + "; ".join(v) for k, v in by.items() if v]


def verdict_section(entries: list[Entry]) -> str:
    """In plain words: what NSA won, lost and tied against full attention (ties: within 1% of the
    loss, 0.05 of an accuracy, 5% of the speed), for each experiment that has an NSA and a full run
    (``make demo``: the language-model pair and the retrieval pair)."""
    pairs = [(nsa, full, _verdict(nsa, full)) for nsa, full in nsa_full_pairs(entries)]
    pairs = [p for p in pairs if p[2]]
    if not pairs:
        return ""
    if len(pairs) == 1:
        nsa, full, rows = pairs[0]
        return (f"## Verdict: {nsa.name} (NSA) against {full.name} (full attention)\n\n"
                + "\n".join(f"- {w}" for w in _verdict_words(rows)) + "\n\n"
                + markdown_table(["measure", "NSA vs full", "outcome"], [list(r) for r in rows], 4) + "\n")
    text, table = "## Verdict: NSA against full attention\n\n", []
    for nsa, full, rows in pairs:
        text += f"- {experiment_of(nsa)} ({nsa.name} vs {full.name}): " + "; ".join(_verdict_words(rows)) + "\n"
        table += [[experiment_of(nsa), *r] for r in rows]
    return text + "\n" + markdown_table(["experiment", "measure", "NSA vs full", "outcome"], table, 4) + "\n"


def build_report(entries: list[Entry], out: Path) -> Path:
    """Write ``out/report.md`` and its figures; returns the report path."""
    if len(entries) < 1:
        raise ValueError("nothing to compare")
    out.mkdir(parents=True, exist_ok=True)
    head = "# " + " vs ".join(e.name for e in entries) + "\n\n"
    head += "Sources: " + "; ".join(f"{e.name}: run {e.run_dir or '-'}, eval {e.eval_dir or '-'}" for e in entries) + "\n\n"
    parts = [head, verdict_section(entries), summary_section(entries), "\n", curves_section(entries, out),
             ppl_section(entries, out), niah_section(entries, out), retrieval_section(entries),
             longbench_section(entries, out), mmlu_section(entries), general_section(entries)]
    path = out / "report.md"
    path.write_text("".join(parts), encoding="utf-8")
    return path


def build_wandb_report(entries: list[Entry], project: str, entity: str, group: str | None = None,
                       markdown: str = ""):
    """A wandb-workspaces Report for the runs' group: loss / throughput curves, eval scalars, NIAH heatmaps,
    and the markdown tables. Not saved here (call ``.save()`` to publish)."""
    import wandb_workspaces.reports.v2 as wr

    names = [e.name for e in entries]
    runset = wr.Runset(entity=entity, project=project, name=group or "runs",
                       filters=f"Group = '{group}'" if group else None)
    curves = [wr.LinePlot(title="train loss", x="Step", y=["train/loss"]),
              wr.LinePlot(title="validation loss", x="Step", y=["val/loss"]),
              wr.LinePlot(title="tokens / s", x="Step", y=["perf/tokens_per_sec"])]
    evals = [wr.BarPlot(title="LongBench average", metrics=["eval/longbench/average"], orientation="v"),
             wr.BarPlot(title="MMLU micro average", metrics=["eval/mmlu/micro_avg"], orientation="v"),
             wr.BarPlot(title="NIAH overall", metrics=["eval/niah/overall"], orientation="v"),
             wr.MediaBrowser(title="NIAH heatmaps", media_keys=["eval/niah/heatmap"], num_columns=max(1, len(names))),
             wr.MediaBrowser(title="loss by position", media_keys=["eval/ppl/loss_by_position"],
                             num_columns=max(1, len(names)))]
    blocks = [wr.H1(text="NSA vs full attention: " + " vs ".join(names)),
              wr.P(text=f"Run group {group!r}: training curves and evaluations side by side."),
              wr.H2(text="Training"), wr.PanelGrid(runsets=[runset], panels=curves),
              wr.H2(text="Evaluations"), wr.PanelGrid(runsets=[runset], panels=evals)]
    if markdown:
        blocks += [wr.H2(text="Tables"), wr.MarkdownBlock(text=markdown)]
    return wr.Report(project=project, entity=entity, title=f"NSA comparison: {group or ', '.join(names)}"[:128],
                     description="Built by eval.compare", blocks=blocks)


def main(argv: list[str] | None = None) -> Path:
    p = argparse.ArgumentParser(prog="python -m eval.compare", description=__doc__.split("\n\n")[0])
    p.add_argument("paths", nargs="+", help="run dirs or eval dirs (two or more to compare)")
    p.add_argument("--out", required=True, help="output directory for report.md and figures")
    p.add_argument("--eval-root", default="outputs/eval", help="where `python -m eval` wrote results")
    p.add_argument("--wandb-report", action="store_true", help="also build a wandb-workspaces report")
    p.add_argument("--project", default=None, help="wandb project (default: the runs' logging.wandb.project)")
    p.add_argument("--entity", default=None, help="wandb entity (required with --wandb-report)")
    p.add_argument("--group", default=None, help="wandb run group (default: the runs' group)")
    p.add_argument("--publish", action="store_true", help="save the wandb report online (needs a login)")
    p.add_argument("--summary", default=None, help="also write the machine-readable summary (JSON) here")
    args = p.parse_args(argv)
    entries = [load_entry(x, args.eval_root) for x in args.paths]
    report = build_report(entries, Path(args.out))
    print(f"[compare] wrote {report}")
    if args.summary:
        Path(args.summary).parent.mkdir(parents=True, exist_ok=True)
        Path(args.summary).write_text(json.dumps(summary(entries), indent=2) + "\n", encoding="utf-8")
        print(f"[compare] wrote {args.summary}")
    if args.wandb_report:
        from eval.checkpoint import run_wandb_group, run_wandb_project

        if not args.entity:
            raise ValueError("--wandb-report needs --entity (the wandb user or team owning the project)")
        group = args.group or next((run_wandb_group(e.run_dir) for e in entries if e.run_dir), None)
        project = args.project or next((run_wandb_project(e.run_dir) for e in entries if e.run_dir), None) or "nsa-pretrain"
        wreport = build_wandb_report(entries, project, args.entity, group, report.read_text())
        if args.publish:
            wreport.save()
            print(f"[compare] wandb report: {wreport.url}")
        else:
            print(f"[compare] built wandb report {wreport.title!r} with {len(wreport.blocks)} blocks (not published)")
    return report


if __name__ == "__main__":
    main()
