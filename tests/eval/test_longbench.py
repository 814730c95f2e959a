"""LongBench prompts, truncation, data loading and the runner on benchmark-format fixtures."""

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from eval.longbench import build_prompt, load_task_samples, run_longbench, truncate_middle
from eval.longbench.runner import results_markdown, score_task, select_tasks
from tests.eval.fakes import CharLM

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parent / "fixtures" / "longbench"


@pytest.fixture(scope="module")
def lb_cfg():
    cfg = OmegaConf.to_container(OmegaConf.load(ROOT / "configs" / "eval" / "longbench.yaml"))
    cfg["data_dir"] = str(FIXTURES)
    return cfg


def test_config_has_the_21_tasks_and_subsets(lb_cfg):
    assert len(lb_cfg["tasks"]) == 21
    assert len(lb_cfg["subsets"]["en_code"]) == 16
    assert len(lb_cfg["subsets"]["longbench_e"]) == 13
    assert lb_cfg["tasks"]["gov_report"]["max_new_tokens"] == 512
    assert lb_cfg["tasks"]["trec"]["metric"] == "classification" and lb_cfg["tasks"]["trec"]["first_line"]
    assert {t["category"] for t in lb_cfg["tasks"].values()} == {
        "single_doc_qa", "multi_doc_qa", "summarization", "few_shot", "synthetic", "code"}


def test_truncate_middle():
    assert truncate_middle(list(range(10)), 4) == [0, 1, 8, 9]
    assert truncate_middle(list(range(10)), 5) == [0, 1, 8, 9]  # half = 5 // 2 on each side
    assert truncate_middle([1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(ValueError):
        truncate_middle([1, 2, 3], 1)


def test_build_prompt(lb_cfg):
    p = build_prompt(lb_cfg["tasks"]["trec"]["prompt"], {"context": "CTX", "input": "Q?"})
    assert p == "Please determine the type of the question below. Here are some examples of questions.\n\nCTX\nQ?"
    p = build_prompt(lb_cfg["tasks"]["lcc"]["prompt"], {"context": "def f():\n", "input": ""})
    assert p == "Please complete the code given below. \ndef f():\nNext line of code:\n"
    with pytest.raises(ValueError, match="context"):
        build_prompt("{context}", {"input": "x"})


def test_load_samples_and_errors(tmp_path):
    rows = load_task_samples("hotpotqa", FIXTURES)
    assert len(rows) == 2 and rows[0]["answers"] == ["Paris"]
    assert len(load_task_samples("hotpotqa", FIXTURES, longbench_e=True)) == 3
    assert len(load_task_samples("hotpotqa", FIXTURES, limit=1)) == 1
    with pytest.raises(ValueError, match="not found"):
        load_task_samples("qasper", FIXTURES)
    (tmp_path / "trec.jsonl").write_text('{"input": "q"}\n')
    with pytest.raises(ValueError, match="lacks fields"):
        load_task_samples("trec", tmp_path)


def test_score_task_buckets(lb_cfg):
    recs = [{"pred": "Nile", "answers": ["Nile"], "length": 1500},
            {"pred": "Kyoto", "answers": ["Tokyo"], "length": 5000},
            {"pred": "Leonardo", "answers": ["Leonardo da Vinci"], "length": 9000}]
    out = score_task(lb_cfg["tasks"]["hotpotqa"], recs, lb_cfg["e_buckets"])
    # F1s: 1, 0, 2*(1)*(1/3)/(4/3) = 0.5 -> mean 50.0
    assert out["score"] == 50.0 and out["n"] == 3
    assert out["buckets"] == {"0-4k": 100.0, "4-8k": 0.0, "8k+": 50.0}


def test_run_longbench_with_scripted_answers(lb_cfg, tmp_path):
    def answer(prompt):
        if "Eiffel" in prompt:
            return "Paris"
        if "Hamlet" in prompt:
            return "Christopher Marlowe"
        if "Louvre" in prompt:
            return "City\nPerson"  # first line only is scored
        if "penicillin" in prompt:
            return "Animal"
        if "段落" in prompt:
            return "段落1"
        if "Apples" in prompt:
            return "2"
        return "    return add(x, 1)\n"

    lm = CharLM(answer)
    cfg = dict(lb_cfg, tasks_to_run=["hotpotqa", "trec", "passage_retrieval_zh", "lcc", "passage_count"], max_length=600)
    results, records = run_longbench(lm, cfg, tmp_path, progress=False)
    t = results["tasks"]
    assert t["hotpotqa"]["score"] == 50.0 and t["hotpotqa"]["truncated"] == 1  # the 30x context is cut
    assert t["trec"]["score"] == 50.0
    assert t["passage_retrieval_zh"]["score"] == 100.0 and t["lcc"]["score"] == 100.0
    assert t["passage_count"]["score"] == 100.0
    assert results["categories"]["multi_doc_qa"] == 50.0
    assert results["categories"]["synthetic"] == 100.0
    assert results["average"] == 80.0
    assert all(r["prompt_tokens"] <= 600 for r in records)
    assert "| hotpotqa | multi_doc_qa | qa_f1 | 2 | 50.00 |" in results_markdown(results, cfg["tasks"])


def test_select_tasks(lb_cfg):
    assert select_tasks(dict(lb_cfg, subset="nsa_paper"))[0] == "multifieldqa_en"
    assert "multifieldqa_zh" not in select_tasks(dict(lb_cfg, subset="all", longbench_e=True))
    with pytest.raises(ValueError, match="unknown LongBench tasks"):
        select_tasks(dict(lb_cfg, tasks_to_run=["nope"]))


def test_default_prompt_budget():
    from eval.longbench.runner import default_max_length

    assert default_max_length(32768) == 32256
    assert default_max_length(512) == 256
