"""MMLU prompt format, categories, scoring and the harness end to end on a tiny model."""

from pathlib import Path

import pytest

from eval import mmlu
from tests.eval.fakes import CharLM

FIXTURES = Path(__file__).parent / "fixtures" / "mmlu"
ROW = {"question": "2 + 2 = ?", "subject": "abstract_algebra", "choices": ["3", "4", "5", "6"], "answer": 1}


def test_categories_cover_57_subjects():
    assert len(mmlu.SUBJECT_CATEGORY) == 57
    counts = {}
    for c in mmlu.SUBJECT_CATEGORY.values():
        counts[c] = counts.get(c, 0) + 1
    assert counts == {"STEM": 18, "humanities": 13, "social_sciences": 12, "other": 14}


def test_prompt_format():
    shot = dict(ROW, question="1 + 1 = ?", choices=["1", "2", "3", "4"], answer="B")
    p = mmlu.build_prompt("abstract_algebra", [shot], ROW)
    assert p == ("The following are multiple choice questions (with answers) about abstract algebra.\n\n"
                 "1 + 1 = ?\nA. 1\nB. 2\nC. 3\nD. 4\nAnswer: B\n\n"
                 "2 + 2 = ?\nA. 3\nB. 4\nC. 5\nD. 6\nAnswer:")
    with pytest.raises(ValueError, match="4 choices"):
        mmlu.format_example(dict(ROW, choices=["a", "b"]), False)
    assert mmlu.answer_index("c") == 2
    with pytest.raises(ValueError):
        mmlu.answer_index(7)


def test_summarize():
    recs = [{"subject": "astronomy", "correct": True}, {"subject": "astronomy", "correct": False},
            {"subject": "philosophy", "correct": True}]
    s = mmlu.summarize(recs)
    assert s["micro_avg"] == 2 / 3 and s["macro_avg"] == 0.75
    assert s["categories"] == {"STEM": {"acc": 0.5, "n": 2}, "humanities": {"acc": 1.0, "n": 1}}


def test_prediction_is_argmax_of_letter_loglikelihoods():
    class ScriptedLM(CharLM):
        max_length = 10_000

        def loglikelihood(self, pairs, batch_size=8, progress=False):
            # favour the letter of the correct answer for astronomy, always 'D' otherwise
            out = []
            for ctx, cont in pairs:
                letter, text = chr(cont[-1]), self.decode(ctx)
                good = {"Great Red Spot": "C", "orbits the Earth": "A"}
                want = next((v for k, v in good.items() if k in text), "D")
                out.append((0.0 if letter == want else -5.0, letter == want))
            return out

    res, recs = mmlu.run_mmlu(ScriptedLM(lambda p: ""), {"data_dir": str(FIXTURES), "num_fewshot": 5}, progress=False)
    assert [r["pred"] for r in recs] == ["C", "A", "D"]
    assert res["subjects"]["astronomy"]["acc"] == 1.0 and res["subjects"]["philosophy"]["acc"] == 0.0
    assert recs[0]["num_fewshot"] == 5 and recs[2]["num_fewshot"] == 2  # philosophy has only 2 dev rows


def test_run_mmlu_tiny_model(tiny_lm):
    res, recs = mmlu.run_mmlu(tiny_lm, {"data_dir": str(FIXTURES), "num_fewshot": 2}, progress=False)
    assert len(recs) == 3 and res["n"] == 3
    assert all(len(r["loglikelihoods"]) == 4 and all(x < 0 for x in r["loglikelihoods"]) for r in recs)
    assert all(r["pred"] == "ABCD"[max(range(4), key=lambda j: r["loglikelihoods"][j])] for r in recs)
    assert 0.0 <= res["micro_avg"] <= 1.0
    assert "| STEM | 2 |" in mmlu.results_markdown(res)


def test_missing_files_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="no MMLU dev files"):
        mmlu.load_split("cais/mmlu", tmp_path, "dev")
