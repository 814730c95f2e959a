"""LongBench metric helpers and errors (values against the official scorer: test_longbench_official.py)."""

import pytest

from eval.longbench import metrics as M


def test_normalize_answer():
    assert M.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert M.normalize_answer("an apple a day") == "apple day"


def test_normalize_zh_answer():
    # ASCII and Chinese punctuation and all whitespace go; "《" is not in the official set and stays
    assert M.normalize_zh_answer("北京 大学。,") == "北京大学"
    assert M.normalize_zh_answer("《红楼梦》") == "《红楼梦"


def test_qa_f1_by_hand():
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: P = 2/3, R = 1, F1 = 0.8
    assert abs(M.qa_f1_score("The Eiffel Tower, Paris", "Eiffel tower") - 0.8) < 1e-12
    assert M.qa_f1_zh_score("北京大学", "北京大学") == 1.0  # jieba: one word each side


def test_rouge_is_the_rouge_package_and_zero_on_its_errors():
    from rouge import Rouge

    pred, gold = "The cat sat. It was on the mat.", "the cat is on the mat"
    assert M.rouge_score(pred, gold) == Rouge().get_scores([pred], [gold], avg=True)["rouge-l"]["f"]
    assert M.rouge_score("", gold) == 0.0 and M.rouge_score(". . .", gold) == 0.0


def test_code_sim_first_line_and_whole_percentages():
    assert M.first_code_line("\n\n```py\n# c\n// d\nx = 1\ny") == "x = 1"
    assert M.first_code_line("# only a comment") == ""
    assert M.code_sim_score("kitten", "sitting") == 0.62  # fuzz.ratio 62 (61.5 rounded), not 8/13


def test_classification_needs_classes():
    with pytest.raises(ValueError, match="all_classes"):
        M.classification_score("Person", "Person")


def test_retrieval_ground_truth_must_name_a_paragraph():
    with pytest.raises(ValueError, match="does not match"):
        M.retrieval_score("1", "7")
    with pytest.raises(ValueError, match="does not match"):
        M.retrieval_zh_score("1", "Paragraph 1")


def test_sample_score_first_line_and_max_over_answers():
    classes = ["Person", "Location"]
    assert M.sample_score("classification", "\nPerson\nLocation", ["Person"], classes, first_line=True) == 1.0
    assert M.sample_score("classification", "\nPerson\nLocation", ["Person"], classes, first_line=False) == 0.5
    assert M.sample_score("qa_f1", "Shakespeare", ["William Shakespeare", "Shakespeare"], None, False) == 1.0
    assert M.cut_first_line("\n\nfirst\nsecond") == "first"
    with pytest.raises(ValueError, match="no reference answers"):
        M.sample_score("qa_f1", "x", [], None, False)
    with pytest.raises(ValueError, match="unknown LongBench metric"):
        M.get_metric("bleu")
