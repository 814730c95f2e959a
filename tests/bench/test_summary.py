"""bench.summary's CPU tables come from the benchmarks' JSON: one row per run and length, the
run named by the file's last dash-separated part."""

import json

from bench.summary import main


def test_cpu_tables_from_json(tmp_path, capsys):
    row = {"seqlen": 8192, "fwd_wall_s_nsa": 0.5, "fwd_wall_s_sdpa": 1.25, "fwd_wall_s_ratio": 2.5,
           "fwd_bwd_wall_s_nsa": 2.0, "fwd_bwd_wall_s_sdpa": 3.0, "fwd_bwd_wall_s_ratio": 1.5,
           "fwd_peak_mb_nsa": 36.2, "fwd_peak_mb_sdpa": 33.0, "fwd_bwd_peak_mb_nsa": 91.0, "fwd_bwd_peak_mb_sdpa": 107.4}
    att = tmp_path / "2026-12-07-attention-cpu-abc-run2.json"
    att.write_text(json.dumps({"summary": [row]}))
    dec = tmp_path / "decode-best.json"
    dec.write_text(json.dumps({"results": [{"context": 65536, "full_ms": 10.0, "nsa_ms": 1.0, "measured_x": 10.0,
                                            "expected_x": 7.76}]}))
    out = tmp_path / "t.md"
    main(["--cpu-attention", str(att), "--cpu-decode", str(dec), "--out", str(out)])
    text = out.read_text()
    assert "| run2 | 8192 | 0.50 | 1.25 | 2.50 | 2.00 | 3.00 | 1.50 | 36 / 33 | 91 / 107 |" in text
    assert "| best | 65536 | 10.000 | 1.000 | 10.00x | 7.76x |" in text
    assert text.strip() == capsys.readouterr().out.strip()
