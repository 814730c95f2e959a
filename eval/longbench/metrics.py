"""LongBench metrics, re-implemented from the benchmark's definitions.

Every metric maps one ``(prediction, ground_truth)`` pair to a score in [0, 1];
the harness takes the max over a sample's reference answers and reports x100.

Dependencies: none required. ``jieba`` (word segmentation for the Chinese
metrics) is used when importable; otherwise Chinese text is tokenised at the
character level (each CJK character is a token, runs of ASCII letters/digits
stay whole words). Character-level F1/ROUGE on Chinese is slightly higher
than word-level (more partial credit), so numbers without jieba are marked
``zh_tokenizer: "char"`` in results.json. ROUGE-L and the edit similarity are
computed here (LCS dynamic programmes) instead of through ``rouge`` /
``fuzzywuzzy``, which are not part of the pinned stack.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_EN_PUNCT = set(string.punctuation)
_ZH_PUNCT = set("！？｡。＂＃＄％＆＇（）＊＋，－／：；＜＝＞＠［＼］＾＿｀｛｜｝～｟｠｢｣､、〃《》「」『』【】〔〕〖〗〘〙〚〛〜〝〞〟〰〾〿–—‘’‛“”„‟…‧﹏.")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_CJK_OR_WORD = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]|[A-Za-z0-9]+|\S")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, drop punctuation and articles, squeeze spaces."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def normalize_zh_answer(text: str) -> str:
    """Chinese normalisation: lower case, drop zh+en punctuation and all whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _EN_PUNCT and ch not in _ZH_PUNCT)
    return "".join(text.split())


def zh_tokenizer_name() -> str:
    """'jieba' when the jieba segmenter is importable, else 'char'."""
    try:
        import jieba  # noqa: F401
    except ImportError:
        return "char"
    return "jieba"


def tokenize_zh(text: str) -> list[str]:
    """Segment Chinese text: jieba words when available, else characters (ASCII words kept whole)."""
    if zh_tokenizer_name() == "jieba":
        import jieba

        return list(jieba.cut(text, cut_all=False))
    return _CJK_OR_WORD.findall(text)


def token_f1(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (harmonic mean of precision and recall of the multiset overlap)."""
    common = Counter(prediction_tokens) & Counter(ground_truth_tokens)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1_score(prediction: str, ground_truth: str, **_) -> float:
    """English QA F1 over whitespace tokens of the normalised strings."""
    return token_f1(normalize_answer(prediction).split(), normalize_answer(ground_truth).split())


def qa_f1_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese QA F1: segment, normalise each token, drop tokens that become empty."""
    pred = [t for t in (normalize_zh_answer(x) for x in tokenize_zh(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(x) for x in tokenize_zh(ground_truth)) if t]
    return token_f1(pred, gold)


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence, O(len(a) * len(b)) time, O(len(b)) memory."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_tokens(prediction_tokens: Sequence[str], ground_truth_tokens: Sequence[str]) -> float:
    """ROUGE-L F-measure (beta = 1): LCS recall and precision, harmonic mean."""
    lcs = lcs_length(prediction_tokens, ground_truth_tokens)
    if lcs == 0:
        return 0.0
    precision = lcs / len(prediction_tokens)
    recall = lcs / len(ground_truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _rouge_tokens_en(text: str) -> list[str]:
    return re.sub(r"[^a-z0-9]+", " ", text.lower()).split()


def rouge_score(prediction: str, ground_truth: str, **_) -> float:
    """English ROUGE-L F over lower-cased alphanumeric tokens."""
    return rouge_l_tokens(_rouge_tokens_en(prediction), _rouge_tokens_en(ground_truth))


def rouge_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese ROUGE-L F over segmented tokens (punctuation and spaces dropped)."""
    pred = [t for t in (normalize_zh_answer(x) for x in tokenize_zh(prediction)) if t]
    gold = [t for t in (normalize_zh_answer(x) for x in tokenize_zh(ground_truth)) if t]
    return rouge_l_tokens(pred, gold)


def classification_score(prediction: str, ground_truth: str, all_classes: Sequence[str] = (), **_) -> float:
    """1/k if the gold class is among the k class names mentioned in the prediction, else 0.

    Class names that are strict substrings of the gold class are not counted as
    mentions (e.g. 'Location' inside 'Other location').
    """
    if not all_classes:
        raise ValueError("classification_score needs all_classes (the task's label set)")
    matches = [c for c in all_classes if c in prediction]
    matches = [c for c in matches if not (c in ground_truth and c != ground_truth)]
    return 1.0 / len(matches) if ground_truth in matches else 0.0


def _retrieval(prediction: str, ground_truth: str, pattern: str) -> float:
    found = re.findall(pattern, ground_truth)
    if not found:
        raise ValueError(f"ground truth {ground_truth!r} does not match {pattern!r}")
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == found[0] for n in numbers) / len(numbers)


def retrieval_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of the numbers in the prediction equal to the gold 'Paragraph N' id."""
    return _retrieval(prediction, ground_truth, r"Paragraph (\d+)")


def retrieval_zh_score(prediction: str, ground_truth: str, **_) -> float:
    """Chinese retrieval: gold id from '段落N'."""
    return _retrieval(prediction, ground_truth, r"段落(\d+)")


def count_score(prediction: str, ground_truth: str, **_) -> float:
    """Fraction of the numbers in the prediction equal to the gold count."""
    numbers = re.findall(r"\d+", prediction)
    if not numbers:
        return 0.0
    return sum(n == str(ground_truth) for n in numbers) / len(numbers)


def edit_similarity(a: str, b: str) -> float:
    """Indel similarity 2*LCS/(|a|+|b|) of two strings (1 = equal; fuzz.ratio / 100 without rounding)."""
    if not a and not b:
        return 1.0
    return 2.0 * lcs_length(a, b) / (len(a) + len(b))


def code_sim_score(prediction: str, ground_truth: str, **_) -> float:
    """Edit similarity of the first code line of the prediction (skipping comment / fence lines)."""
    line = ""
    for candidate in prediction.lstrip("\n").split("\n"):
        if "`" not in candidate and "#" not in candidate and "//" not in candidate:
            line = candidate
            break
    return edit_similarity(line, ground_truth)


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


def sample_score(metric: str, prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None,
                 first_line: bool) -> float:
    """Score of one sample in [0, 1]: max over references, after optional first-line post-processing."""
    if not answers:
        raise ValueError("sample has no reference answers")
    if first_line:
        prediction = prediction.lstrip("\n").split("\n")[0]
    fn = get_metric(metric)
    return max(fn(prediction, gt, all_classes=all_classes or ()) for gt in answers)
