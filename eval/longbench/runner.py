"""Run LongBench tasks on an EvalLM: prompts -> middle truncation -> greedy decoding -> metrics."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from eval.longbench.data import load_task_samples
from eval.longbench.metrics import sample_score, zh_tokenizer_name
from eval.longbench.prompts import build_prompt, truncate_middle


def _mean100(values: Sequence[float]) -> float | None:
    return round(100.0 * sum(values) / len(values), 2) if values else None


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo // 1000}-{hi // 1000}k" if hi is not None else f"{lo // 1000}k+"


def score_task(spec: Mapping, records: Sequence[dict], e_buckets: Sequence | None = None) -> dict:
    """Score predictions of one task: mean x100 overall and (LongBench-E) per length bucket.

    Each record needs ``pred``, ``answers``, ``all_classes``, ``length``; gets ``score`` (0-1) added.
    """
    for r in records:
        r["score"] = sample_score(spec["metric"], r["pred"], r["answers"], r.get("all_classes"),
                                  bool(spec.get("first_line", False)))
    out = {"score": _mean100([r["score"] for r in records]), "n": len(records)}
    if e_buckets:
        out["buckets"] = {}
        for lo, hi in e_buckets:
            sel = [r["score"] for r in records if r.get("length", 0) >= lo and (hi is None or r.get("length", 0) < hi)]
            out["buckets"][bucket_name(lo, hi)] = _mean100(sel)
    return out


def category_averages(task_scores: Mapping[str, float | None], tasks: Mapping[str, Mapping]) -> dict:
    """Mean of task scores per category (tasks with no score are skipped)."""
    cats: dict[str, list[float]] = {}
    for name, score in task_scores.items():
        if score is not None:
            cats.setdefault(tasks[name]["category"], []).append(score)
    return {c: round(sum(v) / len(v), 2) for c, v in cats.items()}


def select_tasks(cfg: Mapping) -> list[str]:
    """Task names to run: ``tasks_to_run`` if given, else the named ``subset``."""
    names = list(cfg.get("tasks_to_run") or cfg["subsets"].get(cfg["subset"], []) or [])
    if not names:
        raise ValueError(f"no LongBench tasks selected (subset={cfg.get('subset')!r}); "
                         f"known subsets: {sorted(cfg['subsets'])}")
    unknown = [t for t in names if t not in cfg["tasks"]]
    if unknown:
        raise ValueError(f"unknown LongBench tasks {unknown}; known: {sorted(cfg['tasks'])}")
    if cfg.get("longbench_e"):
        names = [t for t in names if t in cfg["subsets"]["longbench_e"]]
    return names


def default_max_length(model_max: int) -> int:
    """Prompt budget when none is configured: the model's length less 512 tokens for the answer
    (the benchmark's 31500 for 32k models), at least half of it for short models."""
    return max(model_max - 512, model_max // 2)


def run_longbench(lm, cfg: Mapping, out_dir: Path, progress: bool = True) -> tuple[dict, list[dict]]:
    """Run the selected tasks; returns (results, prediction records)."""
    tasks = cfg["tasks"]
    buckets = cfg.get("e_buckets") if cfg.get("longbench_e") else None
    max_length = int(cfg.get("max_length") or default_max_length(lm.max_length))
    per_task, all_records = {}, []
    for name in select_tasks(cfg):
        spec = tasks[name]
        samples = load_task_samples(name, cfg.get("data_dir"), bool(cfg.get("longbench_e")),
                                    cfg.get("source", "THUDM/LongBench"), cfg.get("limit"))
        prompts, truncated = [], 0
        for s in samples:
            ids = lm.encode(build_prompt(spec["prompt"], s))
            truncated += len(ids) > max_length
            prompts.append(truncate_middle(ids, max_length))
        stops = ["\n"] if spec.get("stop_at_newline") else []
        preds = lm.generate(prompts, int(spec["max_new_tokens"]), batch_size=int(cfg.get("batch_size", 1)),
                            stop_strings=stops, progress=progress, desc=f"longbench/{name}")
        records = [
            {"task": name, "_id": s.get("_id", str(i)), "pred": p, "answers": list(s["answers"]),
             "all_classes": s.get("all_classes"), "length": s.get("length", 0), "prompt_tokens": len(ids)}
            for i, (s, p, ids) in enumerate(zip(samples, preds, prompts, strict=True))
        ]
        per_task[name] = score_task(spec, records, buckets)
        per_task[name]["truncated"] = truncated
        all_records += records
    scores = {t: v["score"] for t, v in per_task.items()}
    valid = [v for v in scores.values() if v is not None]
    results = {
        "tasks": per_task,
        "categories": category_averages(scores, tasks),
        "average": round(sum(valid) / len(valid), 2) if valid else None,
        "zh_tokenizer": zh_tokenizer_name(),
        "max_length": max_length,
        "longbench_e": bool(cfg.get("longbench_e")),
    }
    return results, all_records


def results_markdown(results: Mapping, tasks: Mapping) -> str:
    """results.md: per-task score table (+ buckets for LongBench-E), category averages."""
    from eval.io import markdown_table

    per = results["tasks"]
    bucket_names = sorted({b for v in per.values() for b in v.get("buckets", {})}, key=lambda s: int(s.split("-")[0].rstrip("k+")))
    headers = ["task", "category", "metric", "n", "score"] + bucket_names
    rows = [[t, tasks[t]["category"], tasks[t]["metric"], v["n"], v["score"]] + [v.get("buckets", {}).get(b) for b in bucket_names]
            for t, v in per.items()]
    text = "# LongBench\n\n" + markdown_table(headers, rows)
    text += "\n## Categories\n\n" + markdown_table(["category", "score"], list(results["categories"].items()))
    text += f"\nAverage: {results['average']}  (Chinese tokenisation: {results['zh_tokenizer']}, prompt budget {results['max_length']} tokens)\n"
    return text
