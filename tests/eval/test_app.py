"""``python -m eval``: every task end to end on a tiny checkpoint, outputs well formed."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FIX = Path(__file__).parent / "fixtures"


def compose(overrides):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return hydra_compose("eval", overrides=overrides)


def check_outputs(out: Path, task: str, pngs=()):
    doc = json.loads((out / "results.json").read_text())
    assert doc["task"] == task and doc["results"] and Path(doc["checkpoint"]).is_dir()
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(isinstance(r, dict) for r in rows)
    assert (out / "results.md").read_text().startswith("# ")
    for name in pngs:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    return doc, rows


def test_cli_niah_with_offline_wandb(tiny_runs, tmp_path):
    env = dict(os.environ, WANDB_MODE="offline", PYTHONPATH=str(ROOT))
    cmd = [sys.executable, "-m", "eval", "task=niah", f"checkpoint={tiny_runs['full']}", "niah.context_lengths=[320]",
           "niah.depths=[0.0,1.0]", "niah.samples_per_cell=1", "niah.max_new_tokens=4", f"out_root={tmp_path}",
           "wandb.enabled=true", "progress=false"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = tmp_path / "tiny-full" / "niah"
    assert str(out) in proc.stdout
    doc, rows = check_outputs(out, "niah", ["heatmap.png", "heatmap_exact.png"])
    assert doc["run_dir"] == str(tiny_runs["full"].resolve()) and doc["attention"] == "full"
    assert len(rows) == 2 and doc["results"]["context_lengths"] == [320]
    assert list((out / "wandb").glob("offline-run-*/run-*.wandb"))


def test_mmlu_longbench_ppl(tiny_runs, tmp_path):
    from data.shards import write_shard
    from eval.app import run_task
    from eval.lm import EvalLM

    run = tiny_runs["nsa"]
    common = [f"checkpoint_path={run}", f"out_root={tmp_path}", "progress=false"]
    out = run_task(compose(["task=mmlu", f"mmlu.data_dir={FIX / 'mmlu'}", "mmlu.num_fewshot=1"] + common))
    doc, rows = check_outputs(out, "mmlu", ["categories.png"])
    assert len(rows) == 3 and set(doc["results"]["categories"]) == {"STEM", "humanities"}

    out = run_task(compose(["task=longbench", f"longbench.data_dir={FIX / 'longbench'}", "longbench.max_length=400",
                            "longbench.tasks_to_run=[trec,passage_count,lcc]", "longbench.tasks.trec.max_new_tokens=6",
                            "longbench.tasks.lcc.max_new_tokens=6", "longbench.tasks.passage_count.max_new_tokens=6"]
                           + common))
    doc, rows = check_outputs(out, "longbench", ["scores.png"])
    assert set(doc["results"]["tasks"]) == {"trec", "passage_count", "lcc"} and "tasks" not in doc["config"]
    assert all(0 <= r["score"] <= 1 for r in rows)

    tok = EvalLM.from_checkpoint(run).tokenizer
    text = Path(__import__("string").__file__).read_text()
    data = tmp_path / "data"
    write_shard(data / "validation-00000.bin", [tok.encode(text)[i: i + 200] for i in range(0, 1400, 200)],
                tok.vocab_size)
    out = run_task(compose(["task=ppl", f"ppl.data_dir={data}", "ppl.lengths=[64,256]", "ppl.num_buckets=4"] + common))
    doc, rows = check_outputs(out, "ppl", ["loss_by_position.png"])
    assert set(doc["results"]["lengths"]) == {"64", "256"} and len(rows) == 8


def test_bad_task_and_missing_data(tiny_runs, tmp_path):
    from eval.app import run_task

    with pytest.raises(ValueError, match="task must be one of"):
        run_task({"task": "squad", "checkpoint_path": str(tiny_runs["nsa"])})
    cfg = compose(["task=ppl", f"checkpoint_path={tiny_runs['nsa']}", f"out_root={tmp_path}"])
    with pytest.raises(ValueError, match="validation-"):  # the run config points at outputs/data/no-such-data-bpe4096
        run_task(cfg)


def test_ppl_refuses_data_prepared_since_from_another_config(tiny_runs, tiny_tokenizer_file, tmp_path):
    """The run's data directory was re-prepared with another validation split after training: ppl
    would measure on documents the model trained on, so it stops and says why."""
    import shutil

    from data.prepare import prepare
    from eval.app import run_task

    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"text": f"doc {i} " * 40}) + "\n" for i in range(20)))
    data = {"name": "toy", "source": {"kind": "local", "data_files": str(docs)}, "validation_fraction": 0.2,
            "num_proc": 1, "out_dir": str(tmp_path / "data")}
    prepare(dict(data, validation_fraction=0.5), {"name": "tiny", "path": str(tiny_tokenizer_file), "vocab_size": None})
    run = tmp_path / "run"
    shutil.copytree(tiny_runs["nsa"] / "export", run / "export")
    (run / "config.yaml").write_text(json.dumps({"name": "tiny", "run_name": "run", "data": data,
                                                 "tokenizer": {"name": "tiny"}}))
    cfg = compose(["task=ppl", f"checkpoint_path={run}", f"out_root={tmp_path}", "ppl.lengths=[64]"])
    with pytest.raises(ValueError, match="no longer there.*another data config"):
        run_task(cfg)


@pytest.mark.slow  # lm-eval task indexing; test_lm_eval_adapter covers simple_evaluate in the fast suite
def test_general_suite_through_lm_eval(tiny_runs, tmp_path):
    from eval.app import run_task
    from tests.eval.test_lm_eval_adapter import FIXTURE, TASKS

    (tmp_path / "tiny_mc.yaml").write_text(TASKS.format(
        name="tiny_mc", data=FIXTURE, output_type="multiple_choice", target="answer",
        extra='doc_to_choice: "{{choices}}"\nmetric_list:\n  - metric: acc'))
    cfg = compose(["task=general", f"checkpoint_path={tiny_runs['nsa']}", f"out_root={tmp_path}", "progress=false",
                   f"general.include_path={tmp_path}", "general.suite=[{name: tiny_mc, num_fewshot: 1}]"])
    doc, rows = check_outputs(run_task(cfg), "general")
    assert doc["results"]["tiny_mc"]["num_fewshot"] == 1 and len(rows) == 3
