"""NIAH: needles, scoring, haystack cutting and insertion, and the grid end to end on a tiny model."""

import random

import pytest

from eval import niah
from eval.niah import Haystack, insert_at_depth, make_needle, score_prediction

CFG = {"fact": {"needle": "The key is blue.", "question": "What is the key?", "answer": "blue"},
       "passkey_digits": 5, "value_digits": 7, "num_keys": 3, "num_values": 3}


def test_needles():
    rng = random.Random(0)
    n = make_needle("passkey", rng, CFG)
    assert len(n.answers[0]) == 5 and n.answers[0] in n.lines[0]
    mk = make_needle("multikey", rng, CFG)
    assert len(mk.lines) == 3 and mk.answers[0] in mk.lines[0] and mk.meta["key"] in mk.question
    mv = make_needle("multivalue", rng, CFG)
    assert len(mv.answers) == 3 and all(v in line for v, line in zip(mv.answers, mv.lines, strict=True))
    assert make_needle("fact", rng, CFG).lines == ["The key is blue.\n"]
    cp = make_needle("copy", rng, dict(CFG, copy_words=8))
    words = cp.answers[0].split()
    assert len(set(words)) == 8 and cp.question == "Copy:"
    assert cp.lines == [f"Copy this text exactly: {cp.answers[0]}\n"]  # data.synthetic's copy wording
    with pytest.raises(ValueError, match="copy_words must be in"):
        make_needle("copy", rng, dict(CFG, copy_words=0))
    with pytest.raises(ValueError, match="unknown needle kind"):
        make_needle("haiku", rng, CFG)


def test_score_prediction():
    assert score_prediction(" 12345.\nmore", ["12345"]) == (1.0, 1.0)
    assert score_prediction("it is 12345", ["12345"]) == (1.0, 0.0)
    assert score_prediction("1, 3", ["1", "2", "3"]) == (2 / 3, 0.0)
    assert score_prediction("3, 1, 2", ["1", "2", "3"]) == (1.0, 1.0)
    assert score_prediction("BLUE", ["blue"]) == (1.0, 0.0)


def test_haystack_take_and_insert():
    hay = Haystack(["aa\n", "bbb\n", "c\n"], lambda s: [ord(ch) for ch in s])
    assert hay.total_tokens == 9
    assert hay.lengths == [3, 4, 2]
    assert hay.take_indices(0, 7) == [0, 1]
    assert hay.take_indices(2, 9) == [2, 0, 1]  # wraps around
    assert hay.take_indices(0, 2) == []
    lines = ["a\n", "b\n", "c\n", "d\n"]
    rng = random.Random(0)
    assert insert_at_depth(lines, ["N"], 0.0, rng) == ["N", "a\n", "b\n", "c\n", "d\n"]
    assert insert_at_depth(lines, ["N"], 0.5, rng) == ["a\n", "b\n", "N", "c\n", "d\n"]
    assert insert_at_depth(lines, ["N"], 1.0, rng) == ["a\n", "b\n", "c\n", "d\n", "N"]
    both = insert_at_depth(lines, ["N", "M"], 0.5, rng)
    assert sorted(both) == sorted(lines + ["M", "N"]) and both.index("N") in (2, 3)
    with pytest.raises(ValueError, match="depth"):
        insert_at_depth(lines, ["N"], 1.5, rng)


class _MergingLM:
    """A BOS + character tokenizer that also has one token for the pair "\nT" (so encoding line by
    line and encoding the joined text differ), standing in for sentencepiece's merges."""

    bos_id = 0

    def __init__(self):
        self.tokenizer = self

    def encode(self, text, bos=None):
        ids, i = ([] if bos is False else [0]), 0
        while i < len(text):
            if text.startswith("\nT", i):
                ids.append(1)
                i += 2
            else:
                ids.append(ord(text[i]))
                i += 1
        return ids


def test_prompt_is_encoded_as_one_text_and_fits():
    """The prompt's ids are the encoding of the whole text (merges across line ends included, as in a
    training document), never longer than the target length, with the needle where depth puts it."""
    lm = _MergingLM()
    hay = Haystack(["The grass.\n"] * 40, lambda text: lm.encode(text, bos=False))
    needle = niah.Needle(["The key is 12345.\n"], "What is the key?", ["12345"], "The key is")
    cfg = {"prefix": "Find it.\n", "suffix": "\n{question} {answer_prefix} "}
    for length in (60, 97, 200):
        ids = niah.build_sample(lm, hay, needle, length, 0.5, random.Random(1), cfg)
        text = "".join("\nT" if i == 1 else chr(i) for i in ids[1:])
        assert ids == lm.encode(text) and len(ids) <= length
        assert text.startswith("Find it.\n") and text.endswith("What is the key? The key is")
        before, after = text.split("The key is 12345.\n")
        assert abs(before.count("grass") - after.count("grass")) <= 1  # depth 0.5: the middle line boundary
        assert len(ids) > length - len(lm.encode("The grass.\n", bos=False))  # less than one line short


def test_corpus_lines(tmp_path):
    (tmp_path / "a.txt").write_text("first line\n\nsecond line")
    assert niah.corpus_lines(tmp_path, 1000) == ["first line\n", "second line\n"]
    assert len(niah.corpus_lines("pystdlib", 2000)) > 10
    filler = niah.corpus_lines("passkey_filler", 2000)  # the classic passkey test's haystack
    assert set(filler) == {"The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "}
    assert sum(map(len, filler)) >= 2000
    with pytest.raises(ValueError, match="does not exist"):
        niah.corpus_lines(tmp_path / "missing", 10)


@pytest.mark.parametrize("kind,samples", [("passkey", 2), ("multivalue", 1), ("copy", 1)])
def test_run_niah_tiny_model(tiny_lm, kind, samples, tmp_path):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load("configs/eval/niah.yaml"))
    cfg.update(needle=kind, context_lengths=[320, 448], depths=[0.0, 0.5, 1.0], samples_per_cell=samples, max_new_tokens=3,
               num_values=2)
    results, records = niah.run_niah(tiny_lm, cfg, progress=False)
    assert len(records) == 2 * 3 * samples
    assert all(r["prompt_tokens"] <= r["context_length"] for r in records)
    # cut at a line boundary: one tiny-vocab code line can be ~60 tokens, so allow a quarter of the length
    assert all(r["prompt_tokens"] >= 0.75 * r["context_length"] for r in records)
    assert len(results["score"]) == 2 and len(results["score"][0]) == 3
    assert all(0.0 <= x <= 1.0 for row in results["score"] for x in row)
    assert set(results["per_length"]) == {"320", "448"} and set(results["per_depth"]) == {"0.0", "0.5", "1.0"}
    assert "| 50% |" in niah.results_markdown(results)
    from eval.plots import niah_heatmap

    png = niah_heatmap(results["score"], results["context_lengths"], results["depths"], tmp_path / "h.png")
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_too_short_context_is_an_error(tiny_lm):
    cfg = dict(CFG, prefix="Find it.\n", suffix="\n{question} {answer_prefix}", needle="passkey",
               context_lengths=[8], depths=[0.5], max_new_tokens=2, corpus="pystdlib")
    with pytest.raises(ValueError, match="too short"):
        niah.run_niah(tiny_lm, cfg, progress=False)


WORDS = "river stone quiet lantern harvest meadow copper window silver morning garden letter winter".split()


def _prose(path, paragraphs, words_per_paragraph=120, seed=0):
    """A UTF-8 text with a BOM, CRLF line ends, one long line per paragraph and blank lines between."""
    rng = random.Random(seed)
    paras = [" ".join(rng.choice(WORDS) for _ in range(words_per_paragraph)).capitalize() + ". Café."
             for _ in range(paragraphs)]
    path.write_bytes(b"\xef\xbb\xbf" + "\r\n\r\n".join(paras).encode("utf-8"))
    return paras


def test_user_text_file_corpus(tmp_path):
    paras = _prose(tmp_path / "book", 3)  # any file name
    lines = niah.corpus_lines(tmp_path / "book", 10_000, max_line_chars=200)
    assert all(len(line) <= 200 for line in lines) and len(lines) > 3 * 3
    assert "".join(lines) == "".join(p + "\n" for p in paras)  # long lines cut after spaces, nothing lost
    assert not lines[0].startswith("\ufeff") and "\r" not in "".join(lines)
    assert niah.text_lines("a" * 25 + "\n", 10) == ["a" * 10, "a" * 10, "aaaaa\n"]  # no space: cut anyway
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\nsecond\n".encode("latin-1"))
    assert niah.corpus_lines(tmp_path / "latin1.txt", 100) == ["café au lait\n", "second\n"]
    (tmp_path / "utf16.txt").write_bytes("café\r\nsecond".encode("utf-16"))
    assert niah.corpus_lines(tmp_path / "utf16.txt", 100) == ["café\n", "second\n"]
    (tmp_path / "data.bin").write_bytes(b"\x00\x01binary")
    with pytest.raises(ValueError, match="not plain text"):
        niah.corpus_lines(tmp_path / "data.bin", 100)


def test_user_needles():
    kind, cfg = niah.resolve_needle({"needle": {"needle": "The code word is heron.", "question": "What is the code word?",
                                                "answer": "heron"}})
    needle = make_needle(kind, random.Random(0), cfg)
    assert kind == "fact" and needle.lines == ["The code word is heron.\n"] and needle.answers == ["heron"]
    assert niah.fact_needle({"needle": "Room 42 is blue.", "question": "Which room?", "answer": 42}).answers == ["42"]
    with pytest.raises(ValueError, match="does not occur in the needle"):
        niah.fact_needle({"needle": "The code word is heron.", "question": "Code?", "answer": "crane"})
    with pytest.raises(ValueError, match="non-empty question"):
        niah.fact_needle({"needle": "The code word is heron.", "answer": "heron"})
    with pytest.raises(ValueError, match="unknown needle kind 'passkeys'"):
        niah.resolve_needle({"needle": "passkeys"})


def _user_cfg(tmp_path, **kw):
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load("configs/eval/niah.yaml"))
    cfg.update(needle={"needle": "The code word is heron.", "question": "What is the code word?", "answer": "heron",
                       "answer_prefix": "The code word is"},
               corpus=str(tmp_path / "book.txt"), depths=[0.0, 0.5, 1.0], samples_per_cell=1, max_new_tokens=2, **kw)
    return cfg


def test_run_niah_on_a_user_text_and_needle(tiny_lm, tmp_path):
    _prose(tmp_path / "book.txt", 6)
    results, records = niah.run_niah(tiny_lm, _user_cfg(tmp_path, context_lengths=[256, 448], max_line_chars=100), progress=False)
    assert results["needle"] == "fact" and len(records) == 6
    assert all(0.75 * r["context_length"] <= r["prompt_tokens"] <= r["context_length"] for r in records)
    assert all(r["answers"] == ["heron"] and r["question"] == "What is the code word?" for r in records)


def test_user_text_too_short_is_a_clear_error(tiny_lm, tmp_path):
    _prose(tmp_path / "book.txt", 1, words_per_paragraph=30)
    with pytest.raises(ValueError, match=r"haystack corpus '.*book.txt' is too short for context length 448: it has"):
        niah.run_niah(tiny_lm, _user_cfg(tmp_path, context_lengths=[448]), progress=False)


def _composed_needle(*overrides) -> tuple[str, dict]:
    """``niah.resolve_needle`` of the niah settings that ``python -m eval task=niah OVERRIDES...`` composes."""
    from pathlib import Path

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    root = Path(__file__).resolve().parents[2]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        cfg = compose("eval", overrides=["task=niah", "checkpoint_path=x", *overrides])
    return niah.resolve_needle(OmegaConf.to_container(cfg.niah, resolve=True))


def test_documented_overrides_compose(tmp_path):
    """niah.needle='{needle: ..., question: ..., answer: ...}' and niah.corpus=PATH, as configs/eval/niah.yaml shows."""
    kind, tcfg = _composed_needle(
        f"niah.corpus={tmp_path / 'my notes.txt'}",
        'niah.needle={needle: "The code word is heron.", question: "What is the code word?", answer: heron}')
    assert kind == "fact" and make_needle(kind, random.Random(0), tcfg).answers == ["heron"]
    assert tcfg["corpus"] == str(tmp_path / "my notes.txt")


def test_copy_needle_config_asks_like_the_copy_documents():
    """eval@niah=niah_copy: the needle says what data.synthetic's copy documents say, in the passkey
    filler, and the prompt ends where a copy document's answer starts ("...\\nCopy:")."""
    kind, tcfg = _composed_needle("eval@niah=niah_copy")
    lm = _MergingLM()
    hay = Haystack(niah.corpus_lines(tcfg["corpus"], 4000), lambda text: lm.encode(text, bos=False))
    needle = make_needle(kind, random.Random(0), tcfg)
    ids = niah.build_sample(lm, hay, needle, 300, 0.5, random.Random(1), tcfg)
    text = "".join("\nT" if i == 1 else chr(i) for i in ids[1:])
    assert kind == "copy" and text.endswith("again.\nCopy:")
    assert f"again. Copy this text exactly: {needle.answers[0]}\nThe grass" in text
