"""eval.compare on two tiny runs evaluated by the real app: report sections, figures, wandb report object."""

import json
from pathlib import Path

import pytest

from eval import compare
from tests.eval.test_app import FIX, compose


@pytest.fixture(scope="module")
def evaluated(tiny_runs, tmp_path_factory):
    from data.shards import write_shard
    from eval.app import run_task
    from eval.lm import EvalLM

    root = tmp_path_factory.mktemp("eval_out")
    tok = EvalLM.from_checkpoint(tiny_runs["full"]).tokenizer
    data = root / "data"
    ids = tok.encode(Path(__import__("string").__file__).read_text())
    write_shard(data / "validation-00000.bin", [ids[i: i + 200] for i in range(0, 800, 200)], tok.vocab_size)
    for run in tiny_runs.values():
        common = [f"checkpoint_path={run}", f"out_root={root}", "progress=false"]
        for extra in (["task=niah", "niah.context_lengths=[320]", "niah.depths=[0.0,1.0]", "niah.samples_per_cell=1",
                       "niah.max_new_tokens=3"],
                      ["task=mmlu", f"mmlu.data_dir={FIX / 'mmlu'}", "mmlu.num_fewshot=0"],
                      ["task=longbench", f"longbench.data_dir={FIX / 'longbench'}", "longbench.max_length=300",
                       "longbench.tasks_to_run=[passage_count,trec]", "longbench.tasks.trec.max_new_tokens=4",
                       "longbench.tasks.passage_count.max_new_tokens=4"],
                      ["task=ppl", f"ppl.data_dir={data}", "ppl.lengths=[64]", "ppl.num_buckets=2"]):
            run_task(compose(extra + common))
    return root


def test_report_from_run_dirs_and_eval_dirs(tiny_runs, evaluated, tmp_path):
    out = compare.main([str(tiny_runs["nsa"]), str(evaluated / "tiny-full"), "--out", str(tmp_path / "rep"),
                        "--eval-root", str(evaluated)])
    text = out.read_text()
    for heading in ("## Runs", "## Training curves", "## Held-out perplexity", "## Needle in a haystack",
                    "## LongBench", "## MMLU"):
        assert heading in text
    # throughput: median of the second half of the fixture's constant tokens/s
    assert "| tiny-nsa | nsa | 10 |" in text and "1100.0000" in text and "1000.0000" in text
    for png in ("train_loss.png", "val_loss.png", "throughput.png", "loss_by_position.png", "niah_heatmaps.png",
                "longbench_categories.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG" and f"({png})" in text
    e = compare.load_entry(evaluated / "tiny-full")
    assert e.run_dir == tiny_runs["full"].resolve() and e.attention == "full" and len(e.metrics) == 10


def test_wandb_report_object_offline(tiny_runs, evaluated, tmp_path):
    entries = [compare.load_entry(tiny_runs[k], evaluated) for k in ("nsa", "full")]
    rep = compare.build_wandb_report(entries, "nsa-tests", "someone", "tiny", markdown="| a |\n|---|\n| 1 |\n")
    assert rep.project == "nsa-tests" and rep.entity == "someone"
    grids = [b for b in rep.blocks if type(b).__name__ == "PanelGrid"]
    assert len(grids) == 2 and grids[0].runsets[0].filters == "Group = 'tiny'"
    ys = [p.y for p in grids[0].panels]
    assert ["train/loss"] in ys and ["perf/tokens_per_sec"] in ys
    assert any(getattr(p, "media_keys", None) == ["eval/niah/heatmap"] for p in grids[1].panels)
    # the CLI path builds the same object without publishing
    compare.main([str(tiny_runs["nsa"]), str(tiny_runs["full"]), "--out", str(tmp_path / "r2"), "--eval-root",
                  str(evaluated), "--wandb-report", "--entity", "someone"])


def test_errors_and_throughput(tmp_path):
    with pytest.raises(ValueError, match="neither a run dir"):
        compare.load_entry(tmp_path)
    rows = [{"step": i, "perf/tokens_per_sec": v} for i, v in enumerate([10.0, 100.0, 200.0, 300.0])]
    assert compare.throughput(rows) == {"median": 250.0, "mean": 152.5}
    assert compare.throughput([]) == {"median": None, "mean": None}
    (tmp_path / "niah").mkdir()
    (tmp_path / "niah" / "results.json").write_text(json.dumps({"task": "niah", "run_dir": None, "results": {}}))
    assert compare.load_entry(tmp_path).run_dir is None


def test_longbench_e_table():
    def entry(name, buckets):
        e = compare.Entry(name=name, run_dir=None, eval_dir=None)
        e.results["longbench"] = {"results": {"tasks": {"a": {"score": 1.0, "buckets": buckets[0]},
                                                        "b": {"score": 2.0, "buckets": buckets[1]}}}}
        return e

    text = compare.longbench_e_table([entry("nsa", [{"0-4k": 10.0, "8k+": None}, {"0-4k": 20.0, "8k+": 4.0}]),
                                      entry("plain", [{}, {}])])
    assert "| nsa | 15.00 | 4.00 |" in text and "plain" not in text


def _fake_run(root, name, attention, val_loss, exact, tokens_per_sec):
    """A run dir (metrics.jsonl, config.yaml, git_commit.txt) and its retrieval results."""
    run = root / "runs" / name
    run.mkdir(parents=True)
    rows = [{"step": s, "train/loss": 2.0, "val/loss": val_loss, "perf/tokens_per_sec": tokens_per_sec}
            for s in (10, 20)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run / "config.yaml").write_text(f"attention:\n  kind: {attention}\n")
    (run / "git_commit.txt").write_text("abc1234\n")
    res = {t: {"documents": 4, "answers": 8, "exact": x, "token_acc": x, "doc_exact": x, "lookup_exact": 1.0,
               "lookup_token_acc": 1.0} for t, x in exact.items()}
    out = root / "eval" / name / "retrieval"
    out.mkdir(parents=True)
    (out / "results.json").write_text(json.dumps({"task": "retrieval", "results": res}))
    return run


def test_summary_and_verdict(tmp_path):
    """--summary writes the machine-readable results under short run names; the verdict says in
    words what NSA won, lost and tied against full attention (ties: 1% loss, 0.05 accuracy, 5% speed)."""
    runs = [_fake_run(tmp_path, "probe-full", "full", 2.00, {"copy": 0.95, "mqar": 0.90}, 1000),
            _fake_run(tmp_path, "probe-nsa", "nsa", 2.05, {"copy": 0.93, "mqar": 0.99}, 1500),
            _fake_run(tmp_path, "probe-nsa_window_only", "nsa", 2.30, {"copy": 0.0, "mqar": 0.0}, 2000)]
    out = tmp_path / "rep"
    compare.main([str(r) for r in runs] + ["--out", str(out), "--eval-root", str(tmp_path / "eval"),
                                            "--summary", str(out / "summary.json")])
    s = json.loads((out / "summary.json").read_text())
    assert set(s["runs"]) == {"full", "nsa", "nsa_window_only"} and s["commit"] == "abc1234"
    assert s["runs"]["nsa"]["retrieval"]["mqar"] == {"exact": 0.99, "per_token": 0.99, "answers": 8}
    assert s["runs"]["full"]["val_loss"] == 2.0 and s["runs"]["full"]["steps"] == 20
    text = (out / "report.md").read_text()
    verdict = text.split("## Verdict: probe-nsa (NSA) against probe-full (full attention)")[1].split("## Runs")[0]
    assert "**won**: mqar retrieval, exact answers; training speed (tokens/s)" in verdict
    assert "**lost**: final validation loss (lower is better)" in verdict
    assert "**tied**: copy retrieval, exact answers" in verdict
    assert "*ideal one-token look-up*" in text


def test_summary_counts_every_stage_of_a_curriculum(tmp_path):
    """A run started from another's weights (train.init_from) reports the steps of both stages."""
    first = _fake_run(tmp_path, "probe_lookup-full", "full", 3.0, {}, 1000)
    second = _fake_run(tmp_path, "probe-full", "full", 2.0, {"copy": 0.9}, 1000)
    (second / "config.yaml").write_text(f"attention:\n  kind: full\ntrain:\n  init_from: {first}\n")
    assert compare.stages(second) == [{"run": "probe_lookup-full", "steps": 20}, {"run": "probe-full", "steps": 20}]
    s = compare.summary([compare.load_entry(second, tmp_path / "eval")])
    assert s["runs"]["full"]["steps"] == 40 and len(s["runs"]["full"]["stages"]) == 2
    assert compare.stages(first) == [{"run": "probe_lookup-full", "steps": 20}]


def test_verdict_per_experiment(tmp_path):
    """Runs of two experiments (make demo: a language-model pair and a retrieval pair) get one
    verdict line each, every NSA run set against the full-attention run of its own experiment."""
    runs = [_fake_run(tmp_path, "demo-nsa", "nsa", 2.00, {}, 1000),
            _fake_run(tmp_path, "demo-full", "full", 2.50, {}, 1000),
            _fake_run(tmp_path, "demo_retrieval-nsa", "nsa", 1.00, {"copy": 0.2}, 900),
            _fake_run(tmp_path, "demo_retrieval-full", "full", 1.00, {"copy": 0.9}, 1000)]
    entries = [compare.load_entry(r, tmp_path / "eval") for r in runs]
    assert [(a.name, b.name) for a, b in compare.nsa_full_pairs(entries)] == [
        ("demo-nsa", "demo-full"), ("demo_retrieval-nsa", "demo_retrieval-full")]
    text = compare.verdict_section(entries)
    assert "- demo (demo-nsa vs demo-full): **won**: final validation loss (lower is better)" in text
    assert ("- demo_retrieval (demo_retrieval-nsa vs demo_retrieval-full): **lost**: copy retrieval, exact answers; "
            "training speed (tokens/s); **tied**: final validation loss") in text
    # names without an experiment prefix: all runs form one experiment
    runs = [_fake_run(tmp_path / "b", "nsarun", "nsa", 2.0, {}, 1000), _fake_run(tmp_path / "b", "fullrun", "full", 2.5, {}, 1000)]
    assert len(compare.nsa_full_pairs([compare.load_entry(r, tmp_path / "b" / "eval") for r in runs])) == 1
