"""Our 5-shot MMLU harness (eval/mmlu.py) and lm-eval's own mmlu tasks (through the adapter) on the
same checkpoint, subjects and local data agree: same prompts, same letter log-likelihoods, same
predictions, accuracies within 0.5 points (here: equal). Offline, on fixtures/mmlu_small (cais/mmlu
columns; 3 subjects, 5 dev + 8 test questions each), with the tiny random NSA checkpoint."""

from pathlib import Path

import pytest

from eval import mmlu

FIXTURE = Path(__file__).parent / "fixtures" / "mmlu_small"


@pytest.fixture(scope="module")
def both(tiny_lm, tmp_path_factory):
    import lm_eval
    from lm_eval.tasks import TaskManager

    from eval.lm_eval_adapter import NSALM, local_mmlu_tasks

    ours, records = mmlu.run_mmlu(tiny_lm, {"data_dir": str(FIXTURE), "num_fewshot": 5, "batch_size": 8},
                                  progress=False)
    task_dir = tmp_path_factory.mktemp("mmlu_tasks")
    names = local_mmlu_tasks(FIXTURE, task_dir)
    out = lm_eval.simple_evaluate(model=NSALM(lm=tiny_lm, batch_size=8), tasks=[names[0]], num_fewshot=5,
                                  task_manager=TaskManager(include_path=str(task_dir), include_defaults=False),
                                  log_samples=True, bootstrap_iters=0)
    return ours, records, names, out


def test_local_tasks_are_lm_evals_mmlu_with_local_data(both):
    _, _, names, out = both
    assert names == ["mmlu_local", "mmlu_local_astronomy", "mmlu_local_elementary_mathematics",
                     "mmlu_local_world_religions"]
    cfg = out["configs"]["mmlu_local_astronomy"]
    assert cfg["dataset_path"] == "json" and cfg["fewshot_split"] == "dev" and cfg["num_fewshot"] == 5
    assert cfg["doc_to_choice"] == ["A", "B", "C", "D"] and cfg["fewshot_config"]["sampler"] == "first_n"


def test_same_prompts_loglikelihoods_and_predictions(both):
    _, records, names, out = both
    dev = mmlu.load_split("cais/mmlu", FIXTURE, "dev")
    test = mmlu.load_split("cais/mmlu", FIXTURE, "test")
    ours = {(r["subject"], r["index"]): r for r in records}
    assert len(ours) == 24 and all(r["num_fewshot"] == 5 for r in records)  # nothing dropped for length
    for task in names[1:]:
        subject = task.removeprefix("mmlu_local_")
        rows = [r for r in test if r["subject"] == subject]
        shots = [r for r in dev if r["subject"] == subject][:5]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        assert len(samples) == len(rows) == 8
        for s in samples:
            mine = ours[(subject, s["doc_id"])]
            assert [a[0] for a in s["arguments"]] == [mmlu.build_prompt(subject, shots, rows[s["doc_id"]])] * 4
            assert [a[1] for a in s["arguments"]] == [" A", " B", " C", " D"]
            theirs = [r[0][0] for r in s["resps"]]
            assert theirs == pytest.approx(mine["loglikelihoods"], rel=1e-4, abs=1e-4)
            assert "ABCD"[max(range(4), key=lambda j: theirs[j])] == mine["pred"]
            assert s["acc"] == float(mine["correct"])


def test_accuracies_agree_within_half_a_point(both):
    ours, _, names, out = both
    res = out["results"]
    for task in names[1:]:
        subject = task.removeprefix("mmlu_local_")
        assert abs(100 * res[task]["acc,none"] - 100 * ours["subjects"][subject]["acc"]) <= 0.5
    # lm-eval's mmlu aggregation (acc weighted by size) is our micro average
    assert abs(100 * res["mmlu_local"]["acc,none"] - 100 * ours["micro_avg"]) <= 0.5
    assert ours["n"] == 24


def test_local_tasks_errors(tmp_path):
    from eval.lm_eval_adapter import local_mmlu_tasks

    with pytest.raises(ValueError, match="no MMLU test questions"):
        local_mmlu_tasks(FIXTURE, tmp_path, subjects=["virology"])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "dev.jsonl").write_text('{"question": "q", "subject": "basket_weaving", "choices": ["a","b","c","d"], '
                                   '"answer": 0}\n')
    (bad / "test.jsonl").write_text((bad / "dev.jsonl").read_text())
    with pytest.raises(ValueError, match="not an MMLU subject"):
        local_mmlu_tasks(bad, tmp_path / "out")
