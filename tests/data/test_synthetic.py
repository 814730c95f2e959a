"""Synthetic long-context generators: well-formed documents, answers present and locatable."""

import random
import re

import numpy as np
import pytest

from data.sources import SyntheticSource
from data.synthetic import (
    make_copy_document,
    make_mqar_document,
    make_needle_document,
    make_passkey_document,
    synthetic_texts,
)


def check_spans(doc):
    assert doc.answers and len(doc.answers) == len(doc.answer_spans)
    for ans, (a, b) in zip(doc.answers, doc.answer_spans, strict=True):
        assert doc.text[a:b] == ans
    assert doc.text.startswith(doc.prompt) and doc.text[len(doc.prompt):].startswith(doc.answer)


@pytest.mark.parametrize("depth", [0.0, 0.5, 1.0])
def test_passkey(depth):
    doc = make_passkey_document(random.Random(3), 2000, depth)
    check_spans(doc)
    assert re.fullmatch(r"\d{5}", doc.answer)
    assert doc.prompt.endswith("The pass key is ")
    needle = doc.text.index(f"The pass key is {doc.answer}. Remember it.")
    filler = [m.start() for m in re.finditer("The grass is green", doc.text)]
    assert len(doc.prompt) > 2000
    frac = np.mean([f < needle for f in filler])  # share of the filler placed before the needle
    assert abs(frac - depth) < 0.05


def test_passkey_deterministic_and_numpy_rng():
    a = make_passkey_document(random.Random(7), 500, 0.3)
    b = make_passkey_document(random.Random(7), 500, 0.3)
    assert a.text == b.text
    c = make_passkey_document(np.random.default_rng(0), 500, 0.3)
    check_spans(c)


def test_filler_in_tokens(tokenizer):
    short = make_passkey_document(random.Random(0), 0, 0.5, tokenizer=tokenizer)
    long = make_passkey_document(random.Random(0), 1000, 0.5, tokenizer=tokenizer)
    extra = len(tokenizer.encode(long.text)) - len(tokenizer.encode(short.text))
    sentence = len(tokenizer.encode(make_passkey_document(random.Random(0), 1, 0.5).text)) - \
        len(tokenizer.encode(short.text))
    # filler is counted per sentence, so it reaches 1000 tokens and overshoots by under one sentence
    # (plus a few tokens of BPE merges across sentence joins)
    assert 1000 - 10 <= extra <= 1000 + sentence + 10


def test_needle_with_distractors():
    doc = make_needle_document(random.Random(1), 3000, 0.25, num_needles=4)
    check_spans(doc)
    facts = re.findall(r"The special magic number for (\w+) is: (\d+)\.", doc.prompt)
    assert len(facts) == 4 and len({k for k, _ in facts}) == 4
    assert dict(facts)[doc.meta["key"]] == doc.answer
    assert doc.prompt.rstrip().endswith(f"The special magic number for {doc.meta['key']} is:")


def test_mqar_answers_match_pairs():
    doc = make_mqar_document(random.Random(2), 1500, 0.5, num_pairs=12, num_queries=5)
    check_spans(doc)
    pairs = dict(re.findall(r"(\w{3})=(\d{4})", doc.text.split("Recall:")[0]))
    assert len(pairs) == 12
    queries = re.findall(r" (\w{3})=(\d{4}),", doc.text.split("Recall:")[1])
    assert len(queries) == 5 and [v for _, v in queries] == doc.answers
    assert all(pairs[k] == v for k, v in queries)


def test_invalid_arguments():
    with pytest.raises(ValueError, match="depth"):
        make_passkey_document(random.Random(0), 100, 1.5)
    with pytest.raises(ValueError, match="depth"):
        make_needle_document(random.Random(0), 100, -0.1)
    with pytest.raises(ValueError, match="num_queries"):
        make_mqar_document(random.Random(0), num_pairs=2, num_queries=3)
    with pytest.raises(ValueError, match="n_filler"):
        make_passkey_document(random.Random(0), -1, 0.5)
    with pytest.raises(ValueError, match="rng"):
        make_passkey_document(0, 10, 0.5)
    with pytest.raises(ValueError, match="unknown synthetic task"):
        synthetic_texts(SyntheticSource(task="sudoku"))


def test_synthetic_source_lengths():
    texts = synthetic_texts(SyntheticSource(task="needle", num_documents=20, min_filler_chars=300,
                                           max_filler_chars=900, seed=5))
    assert len(texts) == 20 and len(set(texts)) == 20
    assert all(300 <= len(t) <= 900 + 400 for t in texts)  # filler plus needle, question and answer
    assert texts == synthetic_texts(SyntheticSource(task="needle", num_documents=20, min_filler_chars=300,
                                                    max_filler_chars=900, seed=5))


def test_copy_document_repeats_its_sequence():
    doc = make_copy_document(random.Random(5), 200)
    check_spans(doc)
    ((a, b),) = doc.answer_spans
    seq = doc.text[a:b]
    assert len(seq) >= 200 - 10 and doc.text.count(seq) == 2  # once to read, once as the answer
    assert doc.prompt.endswith("Copy: ") and doc.text.endswith(seq + "\n")
    assert any(ch.isdigit() for ch in seq) and any(ch.isalpha() for ch in seq)
    assert make_copy_document(random.Random(5), 200).text == doc.text  # a pure function of the rng
    texts = synthetic_texts(SyntheticSource(task="copy", num_documents=3, min_filler_chars=20, max_filler_chars=60))
    assert len(texts) == 3 and all(t.startswith("Copy this text exactly.") for t in texts)
