"""Token shard files: header, token array, document-offset index.

Layout (little-endian)::

    header  64 bytes: magic b"NSATOKS\\0", format version u32, itemsize u32 (2 = uint16, 4 = uint32),
                      vocab_size u64, num_tokens u64, num_docs u64, zero padding
    tokens  num_tokens * itemsize bytes (uint16 when vocab_size < 65536, else uint32)
    offsets (num_docs + 1) * u64: document i is tokens[offsets[i]:offsets[i+1]]

Documents are stored without BOS/EOS; the loader adds them. Opening a shard checks the
magic, version, dtype, size and index, and raises a ValueError naming the file.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"NSATOKS\0"
FORMAT_VERSION = 1
HEADER = struct.Struct("<8sIIQQQ")
HEADER_BYTES = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents (token id sequences) to a new shard; ``close()`` writes index and header.

    Written to ``<path>.tmp`` and renamed on close, so a shard that exists is complete.
    """

    def __init__(self, path: str | Path, vocab_size: int):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.offsets = [0]

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def add(self, ids) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{self.path}: a document must be a non-empty 1-d id sequence, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"{self.path}: token id out of range [0, {self.vocab_size})")
        self.f.write(arr.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + arr.size)

    def close(self) -> Path:
        n_docs = len(self.offsets) - 1
        self.f.write(np.asarray(self.offsets, dtype="<u8").tobytes())
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.vocab_size,
                                 self.num_tokens, n_docs))
        self.f.close()
        self.tmp.replace(self.path)
        return self.path


def write_shard(path: str | Path, docs, vocab_size: int) -> Path:
    """Write an iterable of token id sequences as one shard."""
    w = ShardWriter(path, vocab_size)
    for d in docs:
        w.add(d)
    return w.close()


class Shard:
    """A validated, memory-mapped shard: ``len(shard)`` documents, ``shard.doc(i)`` -> np array of ids."""

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"shard {self.path} does not exist")
        size = self.path.stat().st_size
        if size < HEADER_BYTES:
            raise ValueError(f"shard {self.path} is truncated: {size} bytes, shorter than the header")
        with open(self.path, "rb") as f:
            magic, version, itemsize, vocab, n_tok, n_docs = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.path} is not a token shard (bad magic {magic!r}, expected {MAGIC!r})")
        if version != FORMAT_VERSION:
            raise ValueError(f"shard {self.path} has format version {version}, this code reads version "
                             f"{FORMAT_VERSION}: re-run `python -m data.prepare`")
        if itemsize not in (2, 4) or np.dtype(f"<u{itemsize}") != token_dtype(vocab).newbyteorder("<"):
            raise ValueError(f"shard {self.path} has token itemsize {itemsize}, inconsistent with vocab {vocab}")
        expected = HEADER_BYTES + n_tok * itemsize + (n_docs + 1) * 8
        if size != expected:
            kind = "truncated" if size < expected else "longer than its header says"
            raise ValueError(f"shard {self.path} is {kind}: {size} bytes, header implies {expected}")
        if vocab_size is not None and vocab != vocab_size:
            raise ValueError(f"shard {self.path} was tokenised with vocab_size {vocab}, expected {vocab_size} "
                             f"(tokenizer mismatch)")
        self.vocab_size, self.num_tokens, self.num_docs = int(vocab), int(n_tok), int(n_docs)
        self.tokens = np.memmap(self.path, dtype=f"<u{itemsize}", mode="r", offset=HEADER_BYTES,
                                shape=(self.num_tokens,)) if n_tok else np.zeros(0, dtype=f"<u{itemsize}")
        self.offsets = np.fromfile(self.path, dtype="<u8", count=n_docs + 1,
                                   offset=HEADER_BYTES + n_tok * itemsize).astype(np.int64)
        if self.offsets[0] != 0 or self.offsets[-1] != n_tok or np.any(np.diff(self.offsets) <= 0):
            raise ValueError(f"shard {self.path} has a corrupt document index (offsets must rise strictly "
                             f"from 0 to num_tokens={n_tok})")

    def __len__(self) -> int:
        return self.num_docs

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens})"
