"""bench.ab_inproc: the sources it builds and the ratios it reports (the build and the timed
rounds themselves take minutes: run the tool, not a test)."""

import pytest

from bench import ab_inproc
from nsa.ops import cpu_build


def test_summary_ratios_are_per_round_against_the_first_commit():
    times = [[(1.0, 2.0), (2.0, 4.0), (1.0, 2.0)],  # base
             [(0.5, 1.0), (1.0, 2.0), (0.5, 3.0)]]  # half the time, but one slow forward+backward
    base, new = ab_inproc.summarize(["a", "b"], times)
    assert base["fwd_ratio_median"] == 1.0 and base["fwd_bwd_best_s"] == 2.0
    assert new["fwd_ratio_median"] == pytest.approx(0.5) and new["fwd_best_s"] == 0.5
    assert new["fwd_bwd_ratio_median"] == pytest.approx(0.5)  # ratios 0.5, 0.5, 1.5: not the best's 0.5 / 2
    assert new["fwd_bwd_ratio_q3"] > new["fwd_bwd_ratio_median"]
    assert new["fwd_bwd_median_s"] == 2.0


def test_sources_are_the_commits_cpp_files(tmp_path):
    head = ab_inproc.sources("HEAD", tmp_path / "head")
    tree = ab_inproc.sources(ab_inproc.WORKTREE, tmp_path / "tree")
    names = sorted(f.name for f in [*cpu_build.SOURCES, *cpu_build.HEADERS])
    assert sorted(f.name for f in head.iterdir()) == names == sorted(f.name for f in tree.iterdir())
    assert (head / "cpu_vec.h").read_text().startswith("//")


def test_markdown_table_from_json(tmp_path, capsys):
    """bench.summary --ab-inproc renders the tool's JSON: one row per build, the same cells."""
    import json

    from bench.summary import main

    times = [[(1.0, 2.0), (1.0, 2.0)], [(0.9, 1.6), (0.9, 1.6)]]
    path = tmp_path / "ab.json"
    path.write_text(json.dumps({"seqlen": 8192, "rounds": 2, "summary": ab_inproc.summarize(["a1", "b2"], times)}))
    main(["--ab-inproc", str(path)])
    out = capsys.readouterr().out
    assert "| ab.json | 8192 | 2 | b2 | 0.900 / 0.900 | 0.900 (0.900-0.900) | 1.600 / 1.600 | 0.800 (0.800-0.800) |" in out
