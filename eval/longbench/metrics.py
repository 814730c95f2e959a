"""LongBench metrics, computed as the benchmark's official scorer computes them.

The official scorer is THUDM/LongBench ``LongBench/metrics.py`` + ``LongBench/eval.py``; every
metric here uses the same libraries and the same steps, so that per-task scores are comparable
with published numbers (``tests/eval/test_longbench_official.py`` pins them on fixtures whose
expected values were produced by the official definitions):

* ``qa_f1``: SQuAD normalisation (lower case, ASCII punctuation and the articles a/an/the
  dropped, whitespace squeezed), then the F1 of the two bags of whitespace tokens.
* ``qa_f1_zh``: ``jieba.cut`` tokens of each side, each token normalised (lower case, ASCII and
  Chinese punctuation and all whitespace dropped), empty tokens dropped, then bag F1.
* ``rouge``: ``rouge.Rouge().get_scores([pred], [gt], avg=True)["rouge-l"]["f"]`` (the ``rouge``
  package: summary-level ROUGE-L over sentences split at ".", case-sensitive whitespace tokens);
  0.0 whenever the package raises, as the official code's bare ``except`` does (an empty or
  all-"." prediction, and Python's recursion limit hit by ``rouge``'s recursive LCS on a
  "sentence" of more than about a thousand words).
* ``rouge_zh``: both sides cut by jieba and joined with spaces, then ``rouge``.
* ``classification``: the class names that occur (substring) in the prediction, less those that
  are strict substrings of the gold class; 1/k if the gold class is one of the k left, else 0.
  The removal walks the list while deleting from it, as the official loop does, so a name right
  after a removed one is kept (reproduced on purpose).
* ``retrieval`` / ``retrieval_zh``: the fraction of the numbers in the prediction that equal the
  gold paragraph id ("Paragraph N" / "段落N"); ``count``: the same against the gold count.
* ``code_sim``: ``fuzzywuzzy.fuzz.ratio(line, gt) / 100`` (a whole percentage) of the first line
  of the prediction (leading newlines stripped) that has no "`", "#" or "//"; "" if none.
  fuzzywuzzy then uses difflib's ``SequenceMatcher``: the official requirements do not install
  python-Levenshtein, which would change the ratios; ``code_sim_backend()`` says which is active.

Per sample (``sample_score``): for trec, triviaqa, samsum and lsht the prediction is first cut at
its first newline (``first_line``), then the max over the reference answers (floored at 0). The
aggregate x100 rounded to 2 decimals is in ``eval.longbench.runner``.
"""

from __future__ import annotations

import functools
import re
import string
from collections import Counter
from collections.abc import Sequence

_EN_PUNCT = frozenset(string.punctuation)
# The official Chinese punctuation set (it has "》" but not "《"; kept exactly).
_ZH_PUNCT = frozenset(string.punctuation + "！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃》"
                      "「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_DEPS_HINT = "the LongBench metrics need rouge==1.0.1, fuzzywuzzy==0.18.0 and jieba==0.42.1 (make setup)"


@functools.lru_cache(maxsize=None)
def _jieba():
    import logging

    try:
        import jieba
    except ImportError as e:
        raise ImportError(_DEPS_HINT) from e
    jieba.setLogLevel(logging.WARNING)  # no "Building prefix dict ..." lines on every run
    return jieba


@functools.lru_cache(maxsize=None)
def _rouge():
    try:
        from rouge import Rouge
    except ImportError as e:
        raise ImportError(_DEPS_HINT) from e
    return Rouge()


@functools.lru_cache(maxsize=None)
def _fuzz():
    import warnings

    try:
        with warnings.catch_warnings():  # "Using slow pure-python SequenceMatcher": intended, see above
            warnings.simplefilter("ignore")
            from fuzzywuzzy import fuzz
    except ImportError as e:
        raise ImportError(_DEPS_HINT) from e
    if fuzz.SequenceMatcher.__module__ != "difflib":
        warnings.warn("python-Levenshtein is installed, so fuzzywuzzy uses it: code_sim (lcc, repobench-p) then "
                      "differs from the official LongBench scorer, which runs on difflib", stacklevel=2)
    return fuzz


def code_sim_backend() -> str:
    """'difflib' (as the official scorer runs) or 'python-Levenshtein' (ratios differ)."""
    return "difflib" if _fuzz().SequenceMatcher.__module__ == "difflib" else "python-Levenshtein"


def zh_tokenizer_name() -> str:
    """The Chinese word segmenter (recorded in results.json): always jieba, as the official scorer."""
    return "jieba"


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop ASCII punctuation, then articles, squeeze whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower case, drop ASCII and Chinese punctuation, drop all whitespace."""
    return "".join("".join(ch for ch in text.lower() if ch not in _ZH_PUNCT).split())


def tokenize_zh(text: str) -> list[str]:
    """jieba's default (accurate mode, HMM on) segmentation."""
    return list(_jieba().cut(text, cut_all=False))


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (harmonic mean of precision and recall of the multiset overlap)."""
    num_same = sum((Counter(prediction_tokens) & Counter(ground_truth_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """English QA F1 over whitespace tokens of the normalised strings."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def _zh_tokens(text: str) -> list[str]:
    return [t for t in (normalize_zh_answer(x) for x in tokenize_zh(text)) if t]


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese QA F1: jieba tokens, each normalised, empty ones dropped."""
    return token_f1(_zh_tokens(prediction), _zh_tokens(ground_truth))


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """ROUGE-L F of the ``rouge`` package (avg over the one pair); 0.0 when the package raises."""
    try:
        scores = _rouge().get_scores([prediction], [ground_truth], avg=True)
    except Exception:  # the official scorer's bare except: empty input, RecursionError, ...
        return 0.0
    return scores["rouge-l"]["f"]


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """``rouge_score`` of the jieba tokens joined with spaces."""
    return rouge_score(" ".join(tokenize_zh(prediction)), " ".join(tokenize_zh(ground_truth)))


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] | None = None,
                         **_) -> float:
    """1/k if the gold class is among the k class names found in the prediction, else 0 (see above)."""
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the task's label set)")
    matches = [c for c in all_classes if c in prediction]
    i = 0
    while i < len(matches):  # the official for-loop over a list it removes from: skips the next item
        name = matches[i]
        if name in ground_truth and name != ground_truth:
            matches.remove(name)
        i += 1
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"ground truth {ground_truth!r} does not match {pattern!r}")
    return _fraction_equal(prediction, found[0])


def _fraction_equal(prediction: str, target) -> float:
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(target) for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of the numbers in the prediction equal to the gold 'Paragraph N' id."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese retrieval: gold id from '段落N'."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth, **_) -> float:
    """Fraction of the numbers in the prediction equal to the gold count."""
    return _fraction_equal(prediction, ground_truth)


def first_code_line(prediction: str) -> str:
    """The first line (leading newlines stripped) with no '`', '#' or '//'; '' if there is none."""
    for line in prediction.lstrip("\n").split("\n"):
        if "`" not in line and "#" not in line and "//" not in line:
            return line
    return ""


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """``fuzz.ratio`` / 100 of the prediction's first code line and the gold line."""
    return _fuzz().ratio(first_code_line(prediction), ground_truth) / 100


METRICS = {
    "qa_f1": qa_f1_score,
    "qa_f1_zh": qa_f1_zh_score,
    "rouge": rouge_score,
    "rouge_zh": rouge_zh_score,
    "classification": classification_score,
    "retrieval": retrieval_score,
    "retrieval_zh": retrieval_zh_score,
    "count": count_score,
    "code_sim": code_sim_score,
}


def get_metric(name: str):
    """Metric function by its config name."""
    if name not in METRICS:
        raise ValueError(f"unknown LongBench metric {name!r}; known: {sorted(METRICS)}")
    return METRICS[name]


def cut_first_line(prediction: str) -> str:
    """The official few-shot post-processing (trec, triviaqa, samsum, lsht): up to the first newline."""
    return prediction.lstrip("\n").split("\n")[0]


def sample_score(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None,
                 first_line: bool) -> float:
    """Score of one sample in [0, 1]: max over references (from 0.0), after optional first-line cut."""
    if not answers:
        raise ValueError("sample has no reference answers")
    if first_line:
        prediction = cut_first_line(prediction)
    fn = get_metric(metric)
    score = 0.0
    for gt in answers:
        score = max(score, fn(prediction, gt, all_classes=all_classes or ()))
    return score

