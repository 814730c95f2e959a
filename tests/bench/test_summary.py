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
    assert "| run2 | 8192 | 0.50 | 1.25 | 2.50 | 2.00 | 3.00 | 1.50 | 36.2 / 33.0 | 91.0 / 107.4 |" in text
    assert "| best | 65536 | 10.000 | 1.000 | 10.00x | 7.76x |" in text
    assert text.strip() == capsys.readouterr().out.strip()


def test_ab_table_from_rounds(tmp_path, capsys):
    """An A / B file's rounds -> per length and side the best and median time and the peak range."""
    def line(side, fwd, fb, mb):
        m = {"fwd": {"wall_s": fwd, "peak_mb": mb}, "fwd_bwd": {"wall_s": fb, "peak_mb": mb + 50}}
        return f"{side} 8192 " + json.dumps(m)

    ab = tmp_path / "ab.txt"
    ab.write_text("\n".join([line("old", 0.3, 1.0, 36.0), line("new", 0.29, 0.99, 31.8), line("old", 0.31, 1.2, 35.5),
                             line("new", 0.35, 0.9, 32.1), line("old", 0.28, 1.1, 36.1), line("new", 0.3, 1.0, 31.9)]))
    main(["--ab", str(ab)])
    out = capsys.readouterr().out
    assert "| ab.txt | 8192 | old | 3 | 0.280 / 0.300 | 1.000 / 1.100 | 35.5-36.1 | 85.5-86.1 |" in out
    assert "| ab.txt | 8192 | new | 3 | 0.290 / 0.300 | 0.900 / 0.990 | 31.8-32.1 | 81.8-82.1 |" in out
