"""Token shard files: header, token array, document-offset index.

Layout (little-endian)::

    header  64 bytes: magic b"NSATOKS\\0", format version u32, itemsize u32 (2 = uint16, 4 = uint32),
                      vocab_size u64, num_tokens u64, num_docs u64, flags u32, zero padding
    tokens  num_tokens * itemsize bytes (uint16 when vocab_size < 65536, else uint32)
    offsets (num_docs + 1) * u64: document i is tokens[offsets[i]:offsets[i+1]]
    scored  num_tokens * u8, only when flags has LOSS_MASK: 1 if the token is a training target,
            0 if not (random content of synthetic documents, see data.synthetic)

Documents are stored without BOS/EOS; the loader adds them. Opening a shard checks the
magic, version, dtype, size and index, and raises a ValueError naming the file. Version 1
(before the loss mask) is read as a shard without one.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

MAGIC = b"NSATOKS\0"
FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)
HEADER = struct.Struct("<8sIIQQQI")
LOSS_MASK = 1  # header flag: a per-token "scored" array follows the offsets
HEADER_BYTES = 64


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size must be > 0, got {vocab_size}")
    return np.dtype(np.uint16) if vocab_size < 2**16 else np.dtype(np.uint32)


class ShardWriter:
    """Append documents (token id sequences) to a new shard; ``close()`` writes index and header.

    Written to ``<path>.tmp`` and renamed on close, so a shard that exists is complete.
    with_loss_mask: every ``add`` passes ``scored`` (1 = a training target), stored after the index.
    """

    def __init__(self, path: str | Path, vocab_size: int, *, with_loss_mask: bool = False):
        self.path = Path(path)
        self.vocab_size = int(vocab_size)
        self.dtype = token_dtype(self.vocab_size)
        self.tmp = self.path.with_name(self.path.name + ".tmp")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.tmp, "wb")
        self.f.write(b"\0" * HEADER_BYTES)
        self.offsets = [0]
        self.with_loss_mask = bool(with_loss_mask)
        self.scored: list[np.ndarray] = []

    @property
    def num_tokens(self) -> int:
        return self.offsets[-1]

    def add(self, ids, scored=None) -> None:
        arr = np.asarray(ids)
        if arr.ndim != 1 or arr.size == 0:
            raise ValueError(f"{self.path}: a document must be a non-empty 1-d id sequence, got shape {arr.shape}")
        if arr.min() < 0 or arr.max() >= self.vocab_size:
            raise ValueError(f"{self.path}: token id out of range [0, {self.vocab_size})")
        if self.with_loss_mask:
            sc = np.asarray(scored if scored is not None else [], dtype=np.int64)
            if sc.shape != arr.shape or not np.isin(sc, (0, 1)).all():
                raise ValueError(f"{self.path}: scored must be 0/1 per token, shape {arr.shape}, got {sc.shape}")
            self.scored.append(sc.astype(np.uint8))
        elif scored is not None:
            raise ValueError(f"{self.path}: scored given to a writer made without with_loss_mask")
        self.f.write(arr.astype(self.dtype).tobytes())
        self.offsets.append(self.offsets[-1] + arr.size)

    def close(self) -> Path:
        n_docs = len(self.offsets) - 1
        self.f.write(np.asarray(self.offsets, dtype="<u8").tobytes())
        for sc in self.scored:
            self.f.write(sc.tobytes())
        self.f.seek(0)
        self.f.write(HEADER.pack(MAGIC, FORMAT_VERSION, self.dtype.itemsize, self.vocab_size,
                                 self.num_tokens, n_docs, LOSS_MASK if self.with_loss_mask else 0))
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
    """A validated, memory-mapped shard: ``len(shard)`` documents, ``shard.doc(i)`` -> np array of ids;
    ``shard.scored`` (uint8 per token, 1 = a training target) or None when it has no loss mask."""

    def __init__(self, path: str | Path, vocab_size: int | None = None):
        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"shard {self.path} does not exist")
        size = self.path.stat().st_size
        if size < HEADER_BYTES:
            raise ValueError(f"shard {self.path} is truncated: {size} bytes, shorter than the header")
        with open(self.path, "rb") as f:
            magic, version, itemsize, vocab, n_tok, n_docs, flags = HEADER.unpack(f.read(HEADER.size))
        if magic != MAGIC:
            raise ValueError(f"{self.path} is not a token shard (bad magic {magic!r}, expected {MAGIC!r})")
        if version not in READABLE_VERSIONS:
            raise ValueError(f"shard {self.path} has format version {version}, this code reads versions "
                             f"{READABLE_VERSIONS}: re-run `python -m data.prepare`")
        if flags & ~LOSS_MASK:
            raise ValueError(f"shard {self.path} has unknown header flags {flags:#x}")
        with_mask = bool(flags & LOSS_MASK)
        if itemsize not in (2, 4) or np.dtype(f"<u{itemsize}") != token_dtype(vocab).newbyteorder("<"):
            raise ValueError(f"shard {self.path} has token itemsize {itemsize}, inconsistent with vocab {vocab}")
        expected = HEADER_BYTES + n_tok * itemsize + (n_docs + 1) * 8 + (n_tok if with_mask else 0)
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
        self.scored = (np.memmap(self.path, dtype=np.uint8, mode="r", shape=(self.num_tokens,),
                                 offset=HEADER_BYTES + n_tok * itemsize + (n_docs + 1) * 8)
                       if with_mask and n_tok else None)

    def __len__(self) -> int:
        return self.num_docs

    @property
    def doc_lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    def doc(self, i: int) -> np.ndarray:
        return np.asarray(self.tokens[self.offsets[i] : self.offsets[i + 1]])

    def __repr__(self) -> str:
        return f"Shard({str(self.path)!r}, docs={self.num_docs}, tokens={self.num_tokens})"


def token_counts(shards, vocab_size: int, chunk: int = 1 << 26) -> np.ndarray:
    """How often each token id occurs in ``shards`` (:class:`Shard` objects): int64 ``[vocab_size]``,
    counted ``chunk`` tokens at a time (a memory-mapped shard is never read whole)."""
    counts = np.zeros(int(vocab_size), dtype=np.int64)
    for shard in shards:
        for start in range(0, shard.num_tokens, chunk):
            part = np.asarray(shard.tokens[start : start + chunk])
            counts += np.bincount(part, minlength=counts.size)[: counts.size]
    return counts
