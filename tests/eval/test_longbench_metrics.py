"""LongBench metrics against values computed by hand (the arithmetic is in each comment)."""

import math

import pytest

from eval.longbench import metrics as M


@pytest.fixture
def char_zh(monkeypatch):
    """Force the documented character-level Chinese tokenisation (jieba may or may not be installed)."""
    monkeypatch.setattr(M, "zh_tokenizer_name", lambda: "char")


def close(a, b):
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=1e-12)


def test_normalize_answer():
    assert M.normalize_answer("The  Eiffel-Tower, in PARIS!") == "eiffeltower in paris"
    assert M.normalize_answer("an apple a day") == "apple day"


def test_qa_f1():
    # pred tokens [eiffel, tower, paris], gold [eiffel, tower]: P = 2/3, R = 1, F1 = 0.8
    assert close(M.qa_f1_score("The Eiffel Tower, Paris", "Eiffel tower"), 0.8)
    assert M.qa_f1_score("Berlin", "Paris") == 0.0
    assert M.qa_f1_score("the", "Paris") == 0.0  # normalises to nothing
    # repeated tokens count once per match: pred [a1 a1 b], gold [a1 c]: same 1, P 1/3, R 1/2 -> F1 0.4
    assert close(M.qa_f1_score("x x y", "x z"), 0.4)


def test_qa_f1_zh_char(char_zh):
    # chars [北 京 大 学] vs [北 京]: P = 1/2, R = 1 -> 2/3; punctuation is dropped
    assert close(M.qa_f1_zh_score("北京大学。", "北京"), 2 / 3)
    assert M.tokenize_zh("Python是语言") == ["Python", "是", "语", "言"]


def test_rouge_l():
    # LCS(the cat sat on the mat, the cat is on the mat) = 5 of 6 tokens each: F = 5/6
    assert close(M.rouge_score("The cat sat on the mat.", "the cat is on the mat"), 5 / 6)
    # LCS 2 (a, c) of pred 3 / gold 4: P 2/3, R 1/2 -> F = 2*(1/3)/(7/6) = 4/7
    assert close(M.rouge_score("a b c", "a c d e"), 4 / 7)
    assert M.rouge_score("", "a") == 0.0


def test_rouge_l_matches_rouge_score_package():
    rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
    scorer = rouge_scorer.RougeScorer(["rougeL"])
    for pred, gold in [("the quick brown fox jumps", "a quick fox jumped over"),
                       ("summary of the meeting was short", "the meeting summary was short and clear")]:
        ref = scorer.score(gold, pred)["rougeL"].fmeasure
        assert abs(M.rouge_score(pred, gold) - ref) <= 1e-9 * max(ref, 1.0)  # identical LCS arithmetic


def test_rouge_zh_char(char_zh):
    # LCS(今天天气很好, 今天天气不错) = 今天天气 = 4 of 6 chars each -> 2/3
    assert close(M.rouge_zh_score("今天天气很好", "今天天气不错"), 2 / 3)


def test_classification():
    classes = ["Location", "Other Location", "Person"]
    # 'Location' is inside the gold "Other Location" and is not counted as a mention
    assert M.classification_score("Other Location", "Other Location", all_classes=classes) == 1.0
    assert M.classification_score("Location? Person? Other Location", "Other Location", all_classes=classes) == 0.5
    assert M.classification_score("Person", "Other Location", all_classes=classes) == 0.0
    with pytest.raises(ValueError, match="all_classes"):
        M.classification_score("Person", "Person")


def test_retrieval_and_count():
    assert M.retrieval_score("Paragraph 7, maybe Paragraph 12", "Paragraph 7") == 0.5
    assert M.retrieval_score("no idea", "Paragraph 7") == 0.0
    assert M.retrieval_zh_score("段落3", "段落3") == 1.0
    assert close(M.retrieval_zh_score("段落3或段落4或5", "段落3"), 1 / 3)
    with pytest.raises(ValueError, match="does not match"):
        M.retrieval_score("1", "7")
    assert M.count_score("There are 4 unique out of 10", "4") == 0.5
    assert M.count_score("4", 4) == 1.0


def test_edit_similarity_and_code_sim():
    # LCS(kitten, sitting) = 'ittn' = 4 -> 2*4/13 (rapidfuzz fuzz.ratio gives 61.538...)
    assert close(M.edit_similarity("kitten", "sitting"), 8 / 13)
    assert M.edit_similarity("", "") == 1.0
    # first line without a comment/fence: 'return x + 1' (12 chars) vs 'return x+1' (10): LCS 10 -> 20/22
    assert close(M.code_sim_score("\n# comment\nreturn x + 1\nfoo", "return x+1"), 20 / 22)
    assert M.code_sim_score("```\n// c\n", "abc") == 0.0  # no usable line: compares '' with gold


def test_sample_score_first_line_and_max_over_answers():
    classes = ["Person", "Location"]
    assert M.sample_score("classification", "\nPerson\nLocation", ["Person"], classes, first_line=True) == 1.0
    assert M.sample_score("classification", "\nPerson\nLocation", ["Person"], classes, first_line=False) == 0.5
    assert M.sample_score("qa_f1", "Shakespeare", ["William Shakespeare", "Shakespeare"], None, False) == 1.0
    with pytest.raises(ValueError, match="unknown LongBench metric"):
        M.get_metric("bleu")
