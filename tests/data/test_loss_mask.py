"""No loss on the random content of synthetic documents: spans, tokens, shards, loader, prepare.

Training on the text to be copied (or the key-value pairs, or a key's first mention) fits
content no model can predict and teaches that a word just seen will not come again, the
opposite of the look-up every answer needs (tests/train/test_learns_copy.py; issue 18). Each
step from the generator's character spans to the loader's labels is checked here.
"""

import json
import random
import struct

import pytest

from data.loader import IGNORE_INDEX, PackedLoader
from data.prepare import prepare
from data.shards import HEADER_BYTES, Shard, ShardWriter, write_shard
from data.sources import SyntheticSource, load_documents
from data.synthetic import GENERATORS, make_copy_document, make_mqar_document, make_passkey_document

IDS = {"bos_id": 1, "eos_id": 2, "pad_id": 3}


def overlaps(spans, a, b):
    return any(s < b and a < e for s, e in spans)


@pytest.mark.parametrize("task", sorted(GENERATORS))
def test_answers_are_always_trained_on(task):
    for seed in range(5):
        doc = GENERATORS[task](random.Random(seed), 300, 0.4)
        assert doc.no_loss_spans, f"{task}: every synthetic document has random content"
        assert not any(overlaps(doc.no_loss_spans, a, b) for a, b in doc.answer_spans)
        assert all(0 <= a < b <= len(doc.text) for a, b in doc.no_loss_spans)


def test_spans_cover_exactly_the_random_content():
    copy = make_copy_document(random.Random(0), 120)
    (a, b), = copy.no_loss_spans
    assert copy.text[a:b] == copy.answer, "copy: the first copy, nothing else"
    mqar = make_mqar_document(random.Random(1), 200, 0.5, num_pairs=4, num_queries=2)
    (a, b), = mqar.no_loss_spans
    pairs = mqar.text[a:b].split(", ")
    assert len(pairs) == 4 and all(len(p.split(" ")) == 2 for p in pairs)
    assert mqar.text[:a].endswith("Remember these pairs: ")
    passkey = make_passkey_document(random.Random(2), 300, 0.5)
    (a, b), = passkey.no_loss_spans
    assert passkey.text[a:b] == passkey.answer and passkey.text[:a].endswith("The pass key is ")
    assert passkey.text.count(passkey.answer) == 3, "its repetition in the needle and the answer are trained on"


def test_encode_scored_marks_the_tokens_of_a_span(tokenizer):
    doc = make_copy_document(random.Random(3), 60)
    ids, scored = tokenizer.encode_scored(doc.text, doc.no_loss_spans)
    assert ids == tokenizer.encode(doc.text) and len(scored) == len(ids)
    (a, b), = doc.no_loss_spans
    masked = "".join(tokenizer.decode([i]) for i, s in zip(ids, scored, strict=True) if not s)
    assert masked.strip() == doc.text[a:b], "exactly the first copy's tokens (with their leading spaces)"
    text = "né ▁x yz"  # non-ASCII (byte offsets differ from characters) and a literal U+2581
    ids, scored = tokenizer.encode_scored(text, [(text.index("x"), text.index("x") + 1)])
    assert ids == tokenizer.encode(text)
    assert "".join(tokenizer.decode([i]) for i, s in zip(ids, scored, strict=True) if not s).strip() == "x"
    with pytest.raises(ValueError, match="outside"):
        tokenizer.encode_scored("abc", [(1, 9)])


def test_shard_round_trip_and_old_version(tmp_path):
    w = ShardWriter(tmp_path / "m.bin", 100, with_loss_mask=True)
    w.add([5, 6, 7], [1, 0, 1])
    w.add([8, 9], [0, 0])
    s = Shard(w.close())
    assert s.scored.tolist() == [1, 0, 1, 0, 0] and s.doc(1).tolist() == [8, 9]
    with pytest.raises(ValueError, match="0/1 per token"):
        ShardWriter(tmp_path / "x.bin", 100, with_loss_mask=True).add([5, 6], [1])
    with pytest.raises(ValueError, match="without with_loss_mask"):
        ShardWriter(tmp_path / "y.bin", 100).add([5, 6], [1, 1])
    # a version-1 shard (before the mask: same layout, zero where the flags now are) still reads
    old = write_shard(tmp_path / "old.bin", [[5, 6], [7]], 100)
    raw = bytearray(old.read_bytes())
    raw[8:12] = struct.pack("<I", 1)
    old.write_bytes(bytes(raw))
    assert Shard(old).scored is None and Shard(old).doc(0).tolist() == [5, 6]
    assert HEADER_BYTES == 64


def test_loader_labels_skip_unscored_tokens(tmp_path):
    w = ShardWriter(tmp_path / "train-00000.bin", 100, with_loss_mask=True)
    w.add([10, 11, 12, 13], [1, 0, 0, 1])
    w.add([20, 21], [1, 1])
    path = w.close()
    loader = PackedLoader([path], seq_len=8, micro_batch_size=1, shuffle=False, drop_last=False,
                          num_workers=0, **IDS)
    b = next(iter(loader))
    assert b["input_ids"][0].tolist() == [1, 10, 11, 12, 13, 2, 1, 20]
    # targets: 10 yes, 11 and 12 not (unscored), 13 yes, EOS yes; then the row cut
    assert b["labels"][0].tolist() == [10, IGNORE_INDEX, IGNORE_INDEX, 13, 2, IGNORE_INDEX, 20, IGNORE_INDEX]


def test_prepare_stores_the_mask_and_can_leave_it_out(tmp_path, tokenizer):
    src = {"kind": "synthetic", "task": "copy", "num_documents": 12, "min_filler_chars": 20, "max_filler_chars": 60}
    tok = {"name": "t512", "path": tokenizer.path, "vocab_size": tokenizer.vocab_size}
    cfg = {"name": "c", "source": src, "validation_fraction": 0.2, "num_proc": 1}
    out = prepare(cfg, tok, tmp_path / "masked", log=lambda *a: None)
    meta = json.loads((out / "meta.json").read_text())
    shard = Shard(out / meta["splits"]["train"]["shards"][0])
    assert shard.scored is not None and 0.2 < 1 - shard.scored.mean() < 0.6, "about the first copy's share"
    for i in range(len(shard)):  # per document, the unscored tokens decode to its first copy
        ids, sc = shard.doc(i), shard.scored[shard.offsets[i]:shard.offsets[i + 1]]
        text = tokenizer.decode(ids)
        copied = text.split("\nCopy: ")[1].rstrip("\n")
        assert tokenizer.decode(ids[sc == 0]).strip() == copied
    plain = prepare({**cfg, "source": {**src, "mask_unpredictable": False}}, tok, tmp_path / "plain",
                    log=lambda *a: None)
    meta = json.loads((plain / "meta.json").read_text())
    assert Shard(plain / meta["splits"]["train"]["shards"][0]).scored is None


def test_mixture_with_and_without_masked_components(tmp_path):
    txt = tmp_path / "a.txt"
    txt.write_text("plain text document")
    src = {"kind": "mixture", "stopping": "all_exhausted", "components": [
        {"weight": 1, "source": {"kind": "local", "data_files": str(txt)}},
        {"weight": 1, "source": {"kind": "synthetic", "task": "passkey", "num_documents": 3,
                                 "min_filler_chars": 50, "max_filler_chars": 60}}]}
    from data.sources import source_from_dict

    ds = load_documents(source_from_dict(src))
    spans = {t: s for t, s in zip(ds["text"], ds["no_loss"], strict=True)}
    assert spans["plain text document"] == []
    assert all(len(s) == 1 for t, s in spans.items() if "pass key" in t)
    assert SyntheticSource().mask_unpredictable, "on by default"
