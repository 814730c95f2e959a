"""Synthetic long-context generators: well-formed documents, answers present and locatable."""

import random
import re

import numpy as np
import pytest

from data.sources import SyntheticSource
from data.synthetic import (
    WORDS,
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
    pairs = dict(re.findall(r"(\w+) (\w+)", doc.text.split("Remember these pairs: ")[1].split(".\n")[0]))
    assert len(pairs) == 12 and set(pairs) | set(pairs.values()) <= set(WORDS)
    assert len(set(pairs) | set(pairs.values())) == 24  # keys and values all distinct
    queries = re.findall(r" (\w+) (\w+),", doc.text.split("Recall:")[1])
    assert len(queries) == 5 and [v for _, v in queries] == doc.answers
    assert all(pairs[k] == v for k, v in queries)
    old = make_mqar_document(random.Random(2), 1500, 0.5, num_pairs=12, num_queries=5, symbols="chars")
    check_spans(old)
    pairs = dict(re.findall(r"(\w{3})=(\d{4})", old.text.split("Recall:")[0]))
    queries = re.findall(r" (\w{3})=(\d{4}),", old.text.split("Recall:")[1])
    assert len(pairs) == 12 and len(queries) == 5 and all(pairs[k] == v for k, v in queries)


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
    words = seq.split()
    assert set(words) <= set(WORDS) and len(set(words)) == len(words)  # distinct until WORDS run out
    assert make_copy_document(random.Random(5), 200).text == doc.text  # a pure function of the rng
    old = make_copy_document(random.Random(5), 200, symbols="chars").answer
    assert any(ch.isdigit() for ch in old) and any(ch.isalpha() for ch in old)
    texts = synthetic_texts(SyntheticSource(task="copy", num_documents=3, min_filler_chars=20, max_filler_chars=60))
    assert len(texts) == 3 and all(t.startswith("Copy this text exactly: ") for t in texts)
    with pytest.raises(ValueError, match="symbols"):
        make_copy_document(random.Random(0), 10, symbols="emoji")


@pytest.mark.parametrize("depth", [0.0, 0.4, 1.0])
def test_haystack_copy_document_is_the_niah_copy_prompt(depth):
    """make_copy_document(num_words=...) is eval.niah's copy needle (passkey filler) as a training
    document: its prompt is the text NIAH builds from the same filler, list and depth, so a model
    trained on it is scored on NIAH in distribution."""
    from data.synthetic import PASSKEY_FILLER
    from eval.niah import insert_at_depth

    doc = make_copy_document(random.Random(7), 400, depth, num_words=[4, 12])
    check_spans(doc)
    ((a, b),) = doc.answer_spans
    words = doc.text[a:b].split()
    assert 4 <= len(words) <= 12 and len(set(words)) == len(words) and set(words) <= set(WORDS)
    units = doc.text.count(PASSKEY_FILLER[0].rstrip(" "))
    assert units * len(PASSKEY_FILLER[0]) >= 400
    needle = f"Copy this text exactly: {' '.join(words)}\n"
    body = "".join(insert_at_depth(list(PASSKEY_FILLER) * units, [needle], depth, random.Random(0)))
    assert doc.prompt == body.rstrip(" ") + "\nCopy: " and doc.text == doc.prompt + doc.answer + "\n"
    assert doc.no_loss_spans == [(doc.text.index(needle) + len("Copy this text exactly: "),
                                  doc.text.index(needle) + len(needle) - 1)]
    assert make_copy_document(random.Random(7), 400, depth, num_words=[4, 12]).text == doc.text
    assert len(make_copy_document(random.Random(1), 50, num_words=3).answer.split()) == 3
    with pytest.raises(ValueError, match="num_words"):
        make_copy_document(random.Random(0), 50, num_words=[5, 2])
    with pytest.raises(ValueError, match="symbols"):
        make_copy_document(random.Random(0), 50, symbols="chars", num_words=4)


def test_depth_range():
    texts = synthetic_texts(SyntheticSource(task="passkey", num_documents=10, min_filler_chars=800,
                                           max_filler_chars=900, min_depth=0.0, max_depth=0.1))
    assert all(t.index("The pass key is") < 0.3 * len(t) for t in texts)
    with pytest.raises(ValueError, match="max_depth"):
        synthetic_texts(SyntheticSource(task="passkey", num_documents=1, min_depth=0.2, max_depth=1.5))


@pytest.fixture(scope="module")
def demo_tokenizer(tmp_path_factory):
    """The tokenizer `make demo` trains (configs/tokenizer/bpe4096.yaml on the standard library)."""
    from pathlib import Path

    from omegaconf import OmegaConf

    from data.tokenizer import get_tokenizer

    root = Path(__file__).resolve().parents[2]
    cfg = OmegaConf.to_container(OmegaConf.load(root / "configs/tokenizer/bpe4096.yaml"))
    cfg["path"] = str(tmp_path_factory.mktemp("demo_tok") / "bpe4096.model")
    data = OmegaConf.to_container(OmegaConf.load(root / "configs/data/pystdlib.yaml"))
    return get_tokenizer(cfg, data, log=lambda *_: None)


def test_answers_need_only_a_one_token_lookup(demo_tokenizer):
    """The root cause of "no model retrieves" (docs/results/retrieval_probe/): copy and MQAR
    answers made of random letters and numbers are cut into single characters by the demo's
    tokenizer, so an ideal one-token look-up (the induction head small models learn first)
    predicts only ~15% of the copy and ~13% of the MQAR answer tokens, the plateau every trained
    model sat on. With WORDS (one piece each) it predicts them all."""
    from types import SimpleNamespace

    from eval.retrieval import one_token_lookup, tokenize

    tok = demo_tokenizer
    lm = SimpleNamespace(tokenizer=tok, encode=lambda text, bos=None: [tok.bos_id] + tok.encode(text))
    single = [w for w in WORDS if len(tok.encode(" " + w)) == 1]
    assert len(single) >= 0.95 * len(WORDS)

    def lookup_token_acc(task, symbols, n_filler):
        right = total = 0
        for seed in range(12):
            gen = make_copy_document if task == "copy" else make_mqar_document
            doc = gen(random.Random(seed), n_filler, 0.0, symbols=symbols)
            ids, spans = tokenize(lm, doc)  # whole text, as in training; spans: the answers' tokens
            for r, n in one_token_lookup(ids, spans):
                right, total = right + r, total + n
        return right / total

    assert lookup_token_acc("copy", "words", 600) >= 0.97
    assert lookup_token_acc("mqar", "words", 800) >= 0.9
    assert lookup_token_acc("copy", "chars", 600) <= 0.3
    assert lookup_token_acc("mqar", "chars", 800) <= 0.3
