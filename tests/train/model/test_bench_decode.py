"""bench.decode: expected ratios (paper Table 4) and a tiny CPU run end to end."""

import json

import pytest

from bench.decode import PRESETS, expected_ratio, main


@pytest.mark.parametrize("s, paper", [(8192, 4.0), (16384, 6.4), (32768, 9.1), (65536, 11.6)])
def test_expected_ratios_match_table4(s, paper):
    """Table 4 reads s/d compressed + n*l' selected + w window tokens: 2048, 2560, 3584, 5632."""
    assert expected_ratio(s, PRESETS["paper"], paper_rounding=True) == pytest.approx(paper, abs=0.05)
    # exact compressed count floor((s - l)/d) + 1 = s/d - 1: one token fewer, a slightly larger ratio
    exact = expected_ratio(s, PRESETS["paper"])
    assert exact == pytest.approx(s / (s / 16 - 1 + 1024 + 512))


def test_cpu_run_writes_json(tmp_path, monkeypatch):
    small = dict(PRESETS["small"], hidden_size=64, num_heads=4, head_dim_k=16, head_dim_v=16)
    monkeypatch.setitem(PRESETS, "small", small)
    out = tmp_path / "decode.json"
    assert main(["--device", "cpu", "--contexts", "64", "200", "--steps", "2", "--out", str(out)]) == 0
    data = json.loads(out.read_text())
    rows = data["results"]
    assert [r["context"] for r in rows] == [64, 200] and data["meta"]["preset"] == "small"
    for r in rows:
        assert r["full_ms"] > 0 and r["nsa_ms"] > 0
        assert r["expected_x"] == pytest.approx(r["kv_tokens_full"] / r["kv_tokens_nsa"]["total"])
    # at 200 tokens: 24 compressed + min(128, 200) selected + 128 window = 280 tokens read
    assert rows[1]["kv_tokens_nsa"]["total"] == 280
