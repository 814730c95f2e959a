"""Flattening results for wandb, and one offline wandb run with a table and an image."""

from eval.wandb_log import flatten_scalars, log_eval


def test_flatten_scalars():
    res = {"average": 12.5, "n": 3, "ok": True, "name": "x", "tasks": {"trec": {"score": 50.0, "buckets": [1, 2]}}}
    assert flatten_scalars(res) == {"average": 12.5, "n": 3.0, "tasks/trec/score": 50.0}


def test_log_eval_offline(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    from eval.plots import line_plot

    png = line_plot({"a": ([0, 1], [1.0, 0.5])}, tmp_path / "a.png", "x", "y")
    run_dir = log_eval({"mode": "offline"}, name="tiny", task="mmlu", group="g", project="nsa-tests",
                       scalars={"micro_avg": 0.25}, tables={"subjects": (["subject", "acc"], [["astronomy", 0.5]])},
                       images={"curve": png}, out_dir=tmp_path)
    files = [p.name for p in (tmp_path / "wandb").rglob("*")]
    assert run_dir and any(f.endswith(".wandb") for f in files) and any(f.endswith(".table.json") for f in files)
