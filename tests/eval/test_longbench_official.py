"""Our LongBench scores equal the official scorer's (THUDM/LongBench metrics.py + eval.py).

The expected values in fixtures/longbench_official/expected.json were written by
fixtures/longbench_official/make_expected.py, which restates the official definitions without
importing our code and was checked against the official files themselves (``--official``).
Every value must match exactly: same libraries, same arithmetic.
"""

import importlib.metadata as md
import json
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval.longbench import metrics as M
from eval.longbench.runner import score_task

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = json.loads((Path(__file__).parent / "fixtures" / "longbench_official" / "expected.json")
                      .read_text(encoding="utf-8"))
CLASS_SETS = EXPECTED["class_sets"]
# the official function names against our config's metric names
OFFICIAL_TO_OURS = {"qa_f1_score": "qa_f1", "qa_f1_zh_score": "qa_f1_zh", "rouge_score": "rouge",
                    "rouge_zh_score": "rouge_zh", "classification_score": "classification",
                    "retrieval_score": "retrieval", "retrieval_zh_score": "retrieval_zh", "count_score": "count",
                    "code_sim_score": "code_sim"}


@pytest.fixture(scope="module")
def lb_cfg():
    return OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "eval" / "longbench.yaml"))


def test_same_libraries_as_the_fixture():
    """The pinned libraries are the ones the expected values were made with; fuzzywuzzy on difflib."""
    for name in ("rouge", "fuzzywuzzy", "jieba"):
        assert md.version(name) == EXPECTED["libraries"][name], name
    assert M.code_sim_backend() == "difflib"  # python-Levenshtein would change fuzz.ratio
    assert M.zh_tokenizer_name() == "jieba"


def test_every_task_has_the_official_metric_and_post_processing(lb_cfg):
    tasks = lb_cfg["tasks"]
    assert set(tasks) == set(EXPECTED["dataset2metric"]) and len(tasks) == 21
    for name, official in EXPECTED["dataset2metric"].items():
        assert tasks[name]["metric"] == OFFICIAL_TO_OURS[official], name
    assert {t for t, spec in tasks.items() if spec["first_line"]} == set(EXPECTED["first_line_tasks"])
    assert [list(b) for b in lb_cfg["e_buckets"]] == list(EXPECTED["longbench_e_buckets"].values())


@pytest.mark.parametrize("official", sorted(OFFICIAL_TO_OURS))
def test_metric_values_equal_the_official(official):
    fn = M.get_metric(OFFICIAL_TO_OURS[official])
    cases = [p for p in EXPECTED["pairs"] if p["metric"] == official]
    assert len(cases) >= 4
    wrong = []
    for case in cases:
        classes = CLASS_SETS[case["all_classes"]] if case["all_classes"] else None
        got = fn(case["prediction"], case["ground_truth"], all_classes=classes)
        if got != case["expected"]:
            wrong.append((case["note"], case["prediction"][:60], case["ground_truth"], got, case["expected"]))
    assert not wrong, wrong


@pytest.mark.parametrize("task", sorted(EXPECTED["dataset2metric"]))
def test_task_scores_equal_the_official_scorer(task, lb_cfg):
    """Per-sample scores (first-line cut, max over references), the task score (x100, 2 places) and,
    for the LongBench-E tasks, the length buckets, as eval.py computes them."""
    entry = EXPECTED["tasks"][task]
    classes = CLASS_SETS[entry["all_classes"]] if entry["all_classes"] else None
    records = [dict(s, all_classes=classes) for s in entry["samples"]]
    e_buckets = lb_cfg["e_buckets"] if "expected_buckets" in entry else None
    out = score_task(lb_cfg["tasks"][task], records, e_buckets)
    assert [r["score"] for r in records] == entry["expected_sample_scores"]
    assert out["score"] == entry["expected_score"]
    if e_buckets:
        assert out["buckets"] == entry["expected_buckets"]


def test_the_fixture_covers_the_edge_cases():
    notes = " | ".join(p["note"] for p in EXPECTED["pairs"])
    for needle in ("empty prediction", "only periods", "only punctuation", "several names", "skipped by the official",
                   "two numbers", "recursion limit", "half to even", "autojunk"):
        assert needle in notes, needle
    assert all(len(e["samples"]) >= 2 for e in EXPECTED["tasks"].values())
    assert any("\n" in s["pred"] for t in EXPECTED["first_line_tasks"] for s in EXPECTED["tasks"][t]["samples"])
