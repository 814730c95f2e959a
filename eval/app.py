"""The ``python -m eval`` application: load a checkpoint, run one task, write its outputs.

Outputs in ``<out_root>/<name>/<task>/``: ``predictions.jsonl`` (one record per
sample), ``results.json`` (scores + what was evaluated), ``results.md`` (tables),
PNG plots, and ``wandb/`` when wandb logging is on.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from pathlib import Path

from eval.checkpoint import run_data_dir, run_data_mismatch, run_wandb_group, run_wandb_project
from eval.io import write_json, write_jsonl

TASKS = ("niah", "longbench", "mmlu", "ppl", "general", "retrieval")


def _device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def _run_niah(lm, tcfg, out: Path, progress: bool):
    from eval import niah
    from eval.plots import niah_heatmap

    results, records = niah.run_niah(lm, tcfg, progress)
    title = f"{out.parent.name}: {results['needle']}"
    images = {"heatmap": niah_heatmap(results["score"], results["context_lengths"], results["depths"],
                                      out / "heatmap.png", title),
              "heatmap_exact": niah_heatmap(results["exact"], results["context_lengths"], results["depths"],
                                            out / "heatmap_exact.png", title + " (exact)")}
    table = (["context_length", "depth", "sample", "score", "exact", "pred"],
             [[r["context_length"], r["depth"], r["sample"], r["score"], r["exact"], r["pred"]] for r in records])
    return results, records, niah.results_markdown(results), images, {"predictions": table}


def _run_longbench(lm, tcfg, out: Path, progress: bool):
    from eval.longbench.runner import results_markdown, run_longbench
    from eval.plots import grouped_bars

    results, records = run_longbench(lm, tcfg, out, progress)
    names = list(results["tasks"])
    images = {"scores": grouped_bars(names, {out.parent.name: [results["tasks"][t]["score"] for t in names]},
                                     out / "scores.png", "score (x100)", "LongBench")}
    table = (["task", "category", "score", "n"],
             [[t, tcfg["tasks"][t]["category"], v["score"], v["n"]] for t, v in results["tasks"].items()])
    return results, records, results_markdown(results, tcfg["tasks"]), images, {"scores": table}


def _run_mmlu(lm, tcfg, out: Path, progress: bool):
    from eval import mmlu
    from eval.plots import grouped_bars

    results, records = mmlu.run_mmlu(lm, tcfg, progress)
    cats = list(results["categories"])
    images = {"categories": grouped_bars(cats, {out.parent.name: [100 * results["categories"][c]["acc"] for c in cats]},
                                         out / "categories.png", "accuracy (%)", "MMLU")}
    table = (["subject", "category", "n", "acc"],
             [[s, v["category"], v["n"], v["acc"]] for s, v in results["subjects"].items()])
    return results, records, mmlu.results_markdown(results), images, {"subjects": table}


def _run_ppl(lm, tcfg, out: Path, progress: bool, run_dir):
    from eval import ppl
    from eval.plots import line_plot

    data_dir = tcfg.get("data_dir")
    if not data_dir:  # the run's own validation split, unless data.prepare has replaced it since
        data_dir = run_data_dir(run_dir)
        if data_dir is None:
            raise ValueError("ppl needs ppl.data_dir=<data.prepare output dir> (the checkpoint has no run config)")
        if err := run_data_mismatch(run_dir, data_dir):
            raise ValueError(f"ppl: the run's data is no longer there: {err}; or pass ppl.data_dir= to "
                             "evaluate on that directory anyway")
    results = ppl.run_ppl(lm, tcfg, data_dir, progress)
    records = [{"length": int(L), **b} for L, r in results["lengths"].items() for b in r["buckets"]]
    series = {f"L={L}": ([(b["start"] + b["end"]) / 2 for b in r["buckets"]], [b["loss"] for b in r["buckets"]])
              for L, r in results["lengths"].items() if r["buckets"]}
    images = {"loss_by_position": line_plot(series, out / "loss_by_position.png", "position", "loss (nats)",
                                            f"{out.parent.name}: held-out loss by position")}
    table = (["length", "start", "end", "loss", "ppl"], [[r["length"], r["start"], r["end"], r["loss"], r["ppl"]]
                                                         for r in records])
    return results, records, ppl.results_markdown(results), images, {"loss_by_position": table}


def _run_retrieval(lm, tcfg, out: Path, progress: bool):
    from eval import retrieval
    from eval.plots import grouped_bars

    results, records = retrieval.run_retrieval(lm, tcfg, progress)
    tasks = list(results)
    images = {"exact": grouped_bars(tasks, {out.parent.name: [100 * results[t]["exact"] for t in tasks]},
                                    out / "exact.png", "answers retrieved (%)", "Retrieval (held-out synthetic)")}
    table = (["task", "documents", "answers", "exact", "token_acc", "doc_exact"],
             [[t, r["documents"], r["answers"], r["exact"], r["token_acc"], r["doc_exact"]] for t, r in results.items()])
    return results, records, retrieval.results_markdown(results), images, {"retrieval": table}


def _run_general(lm, tcfg, out: Path, progress: bool):
    from eval.io import markdown_table
    from eval.lm_eval_adapter import run_suite, suite_rows

    suite = [dict(x) for x in tcfg["suite"]]
    if tcfg.get("tasks"):
        suite = [x for x in suite if x["name"] in set(tcfg["tasks"])]
        if not suite:
            raise ValueError(f"general.tasks {list(tcfg['tasks'])} matches no suite entry")
    raw = run_suite(lm, suite, limit=tcfg.get("limit"), batch_size=int(tcfg.get("batch_size", 8)),
                    include_path=tcfg.get("include_path"), confirm_run_unsafe_code=bool(tcfg.get("confirm_run_unsafe_code")),
                    log_samples=bool(tcfg.get("log_samples", True)))
    records = [{"suite_task": name, "task": task, **json.loads(json.dumps(s, default=str))}
               for name, entry in raw.items() for task, samples in (entry.get("samples") or {}).items() for s in samples]
    results = {name: {"num_fewshot": e["num_fewshot"], "results": json.loads(json.dumps(e["results"], default=str))}
               for name, e in raw.items()}
    rows = suite_rows(raw)
    md = "# General benchmarks (lm-eval)\n\n" + markdown_table(["suite task", "lm-eval task", "metric", "value"], rows, 4)
    return results, records, md, {}, {"metrics": (["suite_task", "task", "metric", "value"], rows)}


def run_task(cfg: Mapping) -> Path:
    """Run ``cfg.task`` on ``cfg.checkpoint``; returns the output directory."""
    from omegaconf import OmegaConf

    from eval.lm import EvalLM
    from eval.wandb_log import flatten_scalars, log_eval

    task = cfg["task"]
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    checkpoint = cfg.get("checkpoint_path") or cfg.get("checkpoint")
    if not checkpoint:
        raise ValueError("checkpoint=<export dir or run dir> is required")
    tcfg = OmegaConf.to_container(cfg[task], resolve=True) if OmegaConf.is_config(cfg) else dict(cfg[task])
    progress = bool(cfg.get("progress", True))
    t0 = time.time()
    attention = cfg.get("attention") or {}
    attention = OmegaConf.to_container(attention, resolve=True) if OmegaConf.is_config(attention) else dict(attention)
    lm = EvalLM.from_checkpoint(checkpoint, device=_device(cfg.get("device", "auto")), dtype=cfg.get("dtype"),
                                max_length=cfg.get("max_length"), add_bos=bool(cfg.get("add_bos", True)),
                                attention=attention)
    # changed attention settings get their own output folder, next to the run's plain evaluation
    name = cfg.get("name") or lm.info.name + "".join(f"-{k}{v}" for k, v in sorted(attention.items()))
    out = Path(cfg.get("out_root", "outputs/eval")) / name / task
    out.mkdir(parents=True, exist_ok=True)
    if task == "ppl":
        results, records, md, images, tables = _run_ppl(lm, tcfg, out, progress, lm.info.run_dir)
    else:
        runner = {"niah": _run_niah, "longbench": _run_longbench, "mmlu": _run_mmlu, "general": _run_general,
                  "retrieval": _run_retrieval}[task]
        results, records, md, images, tables = runner(lm, tcfg, out, progress)
    saved_cfg = {k: v for k, v in tcfg.items() if k != "tasks" or task != "longbench"}
    doc = {"task": task, "name": name, "checkpoint": str(lm.info.export_dir),
           "run_dir": str(lm.info.run_dir) if lm.info.run_dir else None,
           "attention": getattr(getattr(lm.model, "attn_cfg", None), "kind", None),
           "attention_overrides": attention,
           "seconds": round(time.time() - t0, 2), "config": saved_cfg, "results": results}
    write_json(out / "results.json", doc)
    write_jsonl(out / "predictions.jsonl", records)
    (out / "results.md").write_text(md, encoding="utf-8")
    wcfg = dict(cfg.get("wandb") or {})
    if wcfg.get("enabled"):
        scalars = {k: v for k, v in flatten_scalars(results).items() if "/buckets/" not in k or task != "ppl"}
        log_eval(wcfg, name=name, task=task, group=run_wandb_group(lm.info.run_dir),
                 project=run_wandb_project(lm.info.run_dir), scalars=scalars, tables=tables, images=images,
                 out_dir=out, config={"checkpoint": doc["checkpoint"], "task": task, **saved_cfg})
    print(f"[eval] {task} on {name}: wrote {out}/results.json, results.md, predictions.jsonl"
          + "".join(f", {p.name}" for p in images.values()))
    print(md)
    return out
