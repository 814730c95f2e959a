"""bench.attention end to end at a tiny length: both methods, the stage breakdown, the JSON."""

import json

from bench.attention import main


def test_cpu_run_with_breakdown_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    args = ["--device", "cpu", "--seqlens", "100", "--threads", "1", "--breakdown", "--repeats", "2", "--out", str(out)]
    assert main(args) == 0
    data = json.loads(out.read_text())
    (row,) = data["summary"]
    assert row["seqlen"] == 100
    for phase in ("fwd", "fwd_bwd"):
        assert row[f"{phase}_wall_s_nsa"] > 0 and row[f"{phase}_wall_s_sdpa"] > 0
        assert row[f"{phase}_wall_s_ratio"] == row[f"{phase}_wall_s_sdpa"] / row[f"{phase}_wall_s_nsa"]
    nsa = [r for r in data["results"] if r["method"] == "nsa"][0]
    assert len(nsa["fwd"]["runs"]) == 2 and nsa["fwd"]["wall_s"] == min(m["wall_s"] for m in nsa["fwd"]["runs"])
    (stages,) = [r for r in data["results"] if r["method"] == "nsa_stages"]
    assert list(stages["stages"]) == ["compression", "compressed+select", "selected", "window"]
    assert all(st["fwd"] > 0 and st["bwd"] > 0 for st in stages["stages"].values())
