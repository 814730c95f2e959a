"""Shard files: round trip, dtype choice, and a clear error for every kind of bad file."""

import struct

import numpy as np
import pytest

from data.shards import HEADER_BYTES, Shard, write_shard


@pytest.fixture
def docs():
    rng = np.random.default_rng(0)
    return [rng.integers(0, 1000, size=int(n)) for n in rng.integers(1, 50, size=20)]


def test_round_trip_uint16(tmp_path, docs):
    path = write_shard(tmp_path / "a.bin", docs, vocab_size=1000)
    s = Shard(path, vocab_size=1000)
    assert len(s) == 20 and s.num_tokens == sum(len(d) for d in docs)
    assert s.tokens.dtype == np.uint16
    assert path.stat().st_size == HEADER_BYTES + 2 * s.num_tokens + 8 * 21
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(s.doc(i), d)
    np.testing.assert_array_equal(s.doc_lengths, [len(d) for d in docs])


def test_large_vocab_uses_uint32(tmp_path):
    path = write_shard(tmp_path / "b.bin", [[0, 70000, 65535, 65536]], vocab_size=70001)
    s = Shard(path)
    assert s.tokens.dtype == np.uint32
    np.testing.assert_array_equal(s.doc(0), [0, 70000, 65535, 65536])


def test_writer_rejects_bad_documents(tmp_path):
    with pytest.raises(ValueError, match="out of range"):
        write_shard(tmp_path / "c.bin", [[1, 2, 1000]], vocab_size=1000)
    with pytest.raises(ValueError, match="non-empty"):
        write_shard(tmp_path / "d.bin", [[]], vocab_size=1000)
    assert not (tmp_path / "c.bin").exists(), "a failed write must not leave a shard that looks complete"


def _corrupt(path, offset, data):
    raw = bytearray(path.read_bytes())
    raw[offset : offset + len(data)] = data
    path.write_bytes(bytes(raw))


def test_truncated(tmp_path, docs):
    path = write_shard(tmp_path / "t.bin", docs, vocab_size=1000)
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"t\.bin is truncated"):
        Shard(path)
    path.write_bytes(b"NSA")
    with pytest.raises(ValueError, match=r"t\.bin is truncated.*shorter than the header"):
        Shard(path)


def test_trailing_garbage(tmp_path, docs):
    path = write_shard(tmp_path / "g.bin", docs, vocab_size=1000)
    path.write_bytes(path.read_bytes() + b"xx")
    with pytest.raises(ValueError, match="longer than its header says"):
        Shard(path)


def test_foreign_file(tmp_path):
    path = tmp_path / "foreign.bin"
    path.write_bytes(b"PK\x03\x04" + b"\0" * 200)
    with pytest.raises(ValueError, match=r"foreign\.bin is not a token shard \(bad magic"):
        Shard(path)


def test_old_format_version(tmp_path, docs):
    path = write_shard(tmp_path / "old.bin", docs, vocab_size=1000)
    _corrupt(path, 8, struct.pack("<I", 0))
    with pytest.raises(ValueError, match=r"old\.bin has format version 0.*re-run"):
        Shard(path)


def test_vocab_mismatch(tmp_path, docs):
    path = write_shard(tmp_path / "v.bin", docs, vocab_size=1000)
    with pytest.raises(ValueError, match=r"v\.bin was tokenised with vocab_size 1000, expected 4096"):
        Shard(path, vocab_size=4096)


def test_corrupt_index(tmp_path, docs):
    path = write_shard(tmp_path / "i.bin", docs, vocab_size=1000)
    n_tok = sum(len(d) for d in docs)
    _corrupt(path, HEADER_BYTES + 2 * n_tok + 8 * 3, struct.pack("<Q", 0))  # offsets[3] = 0: not rising
    with pytest.raises(ValueError, match=r"i\.bin has a corrupt document index"):
        Shard(path)


def test_missing_file(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        Shard(tmp_path / "nope.bin")
