"""Tokenizer: exact round trip, special ids, loading and training errors, CLI."""

import pytest

from data.sources import PyStdlibSource, load_documents
from data.tokenizer import BOS_ID, EOS_ID, PAD_ID, Tokenizer, main, train_tokenizer

TRICKY = [
    "",
    "def f(x):\n\tif x:\n\t\treturn x  \n",
    "  leading and trailing spaces  ",
    "windows\r\nline\r\nends\r\n",
    "accents: héllo wörld, façade; CJK: 日本語のテキスト; emoji: 🙂🚀; math: ∑ ≤ ∞",
    "a literal U+2581 ▁ and ▁▁ twice, a tab\tand NUL-ish \x01 control",
    "\n\n\n    \t \n",
    "1234567890 3.14159 0xdeadbeef",
]


@pytest.mark.parametrize("text", TRICKY)
def test_round_trip_exact(tokenizer, text):
    ids = tokenizer.encode(text)
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_round_trip_stdlib_files_not_in_training_sample(tokenizer):
    """Files beyond the 40 the tokenizer saw (different code, docstrings, unicode) come back byte-exact."""
    texts = list(load_documents(PyStdlibSource(max_documents=120))["text"])[80:120]
    for t in texts:
        assert tokenizer.decode(tokenizer.encode(t)) == t
    assert tokenizer.encode_batch(texts[:3]) == [tokenizer.encode(t) for t in texts[:3]]


def test_special_ids_and_compression(tokenizer, stdlib_texts):
    assert (tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id) == (BOS_ID, EOS_ID, PAD_ID)
    text = stdlib_texts[0]
    ids = tokenizer.encode(text)
    assert not {BOS_ID, EOS_ID, PAD_ID} & set(ids), "plain text must never encode to special ids"
    assert tokenizer.decode([BOS_ID] + ids + [EOS_ID, PAD_ID]) == text
    assert len(ids) < len(text.encode()) / 1.5, "a trained BPE should beat raw bytes on its own corpus"


def test_load_existing_model_and_sha(tokenizer):
    again = Tokenizer.load(tokenizer.path)
    assert again.vocab_size == tokenizer.vocab_size == 512
    assert again.sha256 == tokenizer.sha256 and len(again.sha256) == 64
    assert again.encode("import os\n") == tokenizer.encode("import os\n")


def test_load_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Tokenizer.load(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"this is not a protobuf")
    with pytest.raises(ValueError, match="bad.model is not a valid sentencepiece model"):
        Tokenizer.load(bad)


def test_train_errors(tmp_path):
    with pytest.raises(ValueError, match="empty source"):
        train_tokenizer([], tmp_path / "t.model", vocab_size=512)
    with pytest.raises(ValueError, match="too small"):
        train_tokenizer(["abc"], tmp_path / "t.model", vocab_size=100)


def test_check_model_vocab(tokenizer):
    tokenizer.check_model_vocab(512)
    tokenizer.check_model_vocab(576)  # padded embedding tables are fine
    with pytest.raises(ValueError, match="smaller than the tokenizer"):
        tokenizer.check_model_vocab(500)


def test_cli_trains_then_loads(tmp_path, capsys):
    path = tmp_path / "cli.model"
    args = ["data=pystdlib", "data.source.max_documents=20", "tokenizer=bpe4096", "tokenizer.vocab_size=400",
            f"tokenizer.path={path}", "tokenizer.num_threads=1"]
    main(args)
    out = capsys.readouterr().out
    assert "training tokenizer" in out and "round-trip ok" in out and "vocab 400" in out
    mtime = path.stat().st_mtime_ns
    main(args)
    assert "training tokenizer" not in capsys.readouterr().out
    assert path.stat().st_mtime_ns == mtime


def test_small_corpus_stops_below_requested_vocab_and_reloads(tmp_path):
    """On tiny text SentencePiece stops early; reusing the file with the same config must still work."""
    from data.tokenizer import get_tokenizer

    path = tmp_path / "tiny.model"
    tok = train_tokenizer(["def f(x):\n    return x\n"] * 3, path, vocab_size=2000)
    assert tok.vocab_size < 2000
    cfg = {"name": "tiny", "path": str(path), "vocab_size": 2000}
    assert get_tokenizer(cfg).vocab_size == tok.vocab_size
    with pytest.raises(ValueError, match="asks for 4096"):
        get_tokenizer(cfg | {"vocab_size": 4096})


def test_too_many_characters_for_vocab_is_a_value_error(tmp_path):
    text = "".join(chr(0x4E00 + i) for i in range(600))  # 600 distinct CJK characters
    with pytest.raises(ValueError, match="could not train .*Vocabulary size is smaller than required_chars"):
        train_tokenizer([text] * 5, tmp_path / "cjk.model", vocab_size=300)
