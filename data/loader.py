"""PackedLoader: rows of ``seq_len`` tokens with document boundaries, sharded, prefetched, resumable.

Every epoch lays the split out as a stream: documents in a seeded order, each as
``[BOS] tokens [EOS]``. Packed mode cuts the stream into rows of ``seq_len`` tokens; a
document that crosses a row boundary is split, and each piece is its own segment
(``cu_seqlens`` entry, positions from 0, no target across the cut). Unpacked mode puts one
document per row, cropped to ``seq_len`` or padded. Rows are then shuffled.

Step ``s`` of an epoch takes global rows ``[s*W*B, (s+1)*W*B)`` of that row order (W ranks,
B rows each); rank ``r`` gets the ``r``-th block of B. So ranks are disjoint, together
they cover every row, and the stream does not depend on how it is split into ranks,
micro-batches or gradient-accumulation steps. The state is (epoch, global rows consumed):
it resumes exactly, also with a different micro-batch size, world size (same position),
prefetch depth or number of worker threads. Boundaries come from the shards' document
index, never from searching for an EOS id.

A batch is a dict: ``input_ids [B,T]`` long, ``labels [B,T]`` long (-100 at the last token
of each segment, on padding and where the shard's loss mask says a token is not a target), ``position_ids [B,T]`` long, ``cu_seqlens [N+1]`` int32 over
the flattened ``B*T`` tokens (padding is a segment of its own), ``max_seqlen`` int.
"""

from __future__ import annotations

import json
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from data.shards import Shard

IGNORE_INDEX = -100
STATE_VERSION = 1


@dataclass
class _Layout:
    """One epoch's row layout: document order, stream offsets, row order."""

    order: np.ndarray  # [N] document ids in stream order (packed) / row order (unpacked)
    cum: np.ndarray  # [N+1] stream offset of each document in `order` (packed only)
    row_order: np.ndarray  # [R] physical row index of each global row slot


def resolve_shards(data, split: str) -> tuple[list[Path], dict]:
    """Shard paths and meta.json (or {}) for a prepared directory or an explicit list of shard files."""
    if isinstance(data, (str, Path)) and Path(data).is_dir():
        root = Path(data)
        meta_path = root / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"{root} has no meta.json: run `python -m data.prepare` first")
        meta = json.loads(meta_path.read_text())
        if split not in meta.get("splits", {}):
            raise ValueError(f"{root} has no split {split!r}; it has {sorted(meta.get('splits', {}))}")
        paths = [root / n for n in meta["splits"][split]["shards"]]
        if not paths:
            raise ValueError(f"split {split!r} of {root} is empty (no shards)")
        return paths, meta
    paths = [Path(data)] if isinstance(data, (str, Path)) else [Path(p) for p in data]
    if not paths:
        raise ValueError("no shard paths given")
    meta_path = paths[0].parent / "meta.json"
    return paths, (json.loads(meta_path.read_text()) if meta_path.is_file() else {})


class PackedLoader:
    """Iterate batches of packed (or padded) rows; see the module docstring for the layout.

    data: a prepared directory (reads meta.json: shard list, special ids, vocab) or shard paths
    (then pass bos_id / eos_id / pad_id). shuffle: documents and rows, per epoch, from ``seed``.
    drop_last: drop the tail tokens that do not fill a row and the tail rows that do not fill a
    step; without it they are padded (ranks may then get all-padding rows: every label -100).
    epochs: stop after this many epochs in total (None: endless). vocab_size: if given, shards
    must have been tokenised with exactly this vocabulary. num_workers: threads building
    batches (0: in the consumer), prefetch: batches built ahead.
    """

    def __init__(self, data, *, split: str = "train", seq_len: int, micro_batch_size: int, rank: int = 0,
                 world_size: int = 1, seed: int = 0, packed: bool = True, shuffle: bool = True,
                 drop_last: bool = True, epochs: int | None = None, prefetch: int = 2, num_workers: int = 1,
                 add_bos: bool = True, add_eos: bool = True, vocab_size: int | None = None,
                 bos_id: int | None = None, eos_id: int | None = None, pad_id: int | None = None):
        if seq_len < 2 or micro_batch_size < 1:
            raise ValueError(f"need seq_len >= 2 and micro_batch_size >= 1, got {seq_len}, {micro_batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if prefetch < 1 or num_workers < 0:
            raise ValueError(f"need prefetch >= 1 and num_workers >= 0, got {prefetch}, {num_workers}")
        paths, self.meta = resolve_shards(data, split)
        tmeta = self.meta.get("tokenizer", {})
        if vocab_size is not None and self.meta.get("vocab_size") not in (None, vocab_size):
            raise ValueError(f"data in {paths[0].parent} was tokenised with vocab_size {self.meta['vocab_size']}, "
                             f"expected {vocab_size} (tokenizer mismatch)")
        self.shards = [Shard(p, vocab_size or self.meta.get("vocab_size")) for p in paths]
        self.vocab_size = self.shards[0].vocab_size
        for s in self.shards:
            if s.vocab_size != self.vocab_size:
                raise ValueError(f"shard {s.path} has vocab_size {s.vocab_size}, {paths[0]} has {self.vocab_size}")
        ids = {"bos_id": bos_id, "eos_id": eos_id, "pad_id": pad_id}
        for k in ids:
            ids[k] = tmeta.get(k) if ids[k] is None else ids[k]
            if ids[k] is None:
                raise ValueError(f"{k} unknown: pass it, or load shards from a directory with meta.json")
        self.bos_id, self.eos_id, self.pad_id = ids["bos_id"], ids["eos_id"], ids["pad_id"]
        tok_file = tmeta.get("file")
        self.tokenizer_path = str(paths[0].parent / tok_file) if tok_file else None

        self.split, self.seq_len, self.micro_batch_size = split, seq_len, micro_batch_size
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.packed, self.shuffle, self.drop_last, self.epochs = packed, shuffle, drop_last, epochs
        self.prefetch, self.num_workers = prefetch, num_workers
        self.add_bos, self.add_eos = bool(add_bos), bool(add_eos)

        lengths = [s.doc_lengths for s in self.shards]
        self.doc_len = np.concatenate(lengths)  # [N] stored tokens per document
        self.doc_shard = np.concatenate([np.full(len(x), i, dtype=np.int32) for i, x in enumerate(lengths)])
        self.doc_local = np.concatenate([np.arange(len(x)) for x in lengths])
        self.num_documents = len(self.doc_len)
        self.stream_len = self.doc_len + self.add_bos + self.add_eos  # [N] tokens with BOS/EOS
        self.num_tokens = int(self.stream_len.sum())
        if packed:
            self.rows_per_epoch = (self.num_tokens // seq_len) if drop_last else -(-self.num_tokens // seq_len)
        else:
            self.rows_per_epoch = self.num_documents
        self.rows_per_step = world_size * micro_batch_size
        steps = self.rows_per_epoch / self.rows_per_step
        self.steps_per_epoch = int(steps) if drop_last else int(np.ceil(steps))
        if self.steps_per_epoch == 0:
            raise ValueError(f"split {split!r} ({self.num_documents} documents, {self.num_tokens} tokens) is too "
                             f"small for one step of {world_size} ranks x {micro_batch_size} rows x {seq_len} tokens")
        self.epoch, self.rows_consumed = 0, 0
        self._layouts: dict[int, _Layout] = {}

    # ------------------------------------------------------------------ layout

    def _layout(self, epoch: int) -> _Layout:
        if epoch not in self._layouts:
            rng = np.random.default_rng([self.seed, epoch])
            n = self.num_documents
            order = rng.permutation(n) if self.shuffle else np.arange(n)
            cum = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(self.stream_len[order], out=cum[1:])
            rows = rng.permutation(self.rows_per_epoch) if self.shuffle else np.arange(self.rows_per_epoch)
            self._layouts = {epoch: _Layout(order, cum, rows), **{k: v for k, v in self._layouts.items()
                                                                   if k == epoch - 1}}
        return self._layouts[epoch]

    def _piece(self, doc: int, a: int, b: int) -> tuple[np.ndarray, np.ndarray]:
        """Tokens [a, b) of document ``doc`` as laid out in the stream, i.e. with BOS/EOS, and
        whether each is a training target (the shard's loss mask; BOS/EOS always are)."""
        n = int(self.doc_len[doc])
        out = np.empty(b - a, dtype=np.int64)
        scored = np.ones(b - a, dtype=bool)
        c0, c1 = max(a - self.add_bos, 0), min(b - self.add_bos, n)  # content index range
        w = 0
        if self.add_bos and a == 0:
            out[0], w = self.bos_id, 1
        if c1 > c0:
            shard = self.shards[self.doc_shard[doc]]
            start = int(shard.offsets[self.doc_local[doc]])
            out[w : w + c1 - c0] = shard.tokens[start + c0 : start + c1]
            if shard.scored is not None:
                scored[w : w + c1 - c0] = shard.scored[start + c0 : start + c1]
            w += c1 - c0
        if w < b - a:  # only the EOS can remain
            out[w] = self.eos_id
        return out, scored

    def _row_segments(self, layout: _Layout, row: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """The document pieces that fill physical row ``row`` (padding is added by the caller)."""
        T = self.seq_len
        if not self.packed:
            doc = int(layout.order[row])
            return [self._piece(doc, 0, min(int(self.stream_len[doc]), T))]
        lo, hi = row * T, min((row + 1) * T, self.num_tokens)
        k = int(np.searchsorted(layout.cum, lo, side="right")) - 1
        segs = []
        while k < self.num_documents and layout.cum[k] < hi:
            s0, s1 = max(int(layout.cum[k]), lo), min(int(layout.cum[k + 1]), hi)
            segs.append(self._piece(int(layout.order[k]), s0 - int(layout.cum[k]), s1 - int(layout.cum[k])))
            k += 1
        return segs

    def _build(self, layout: _Layout, first_slot: int) -> dict:
        """Batch of this rank's B rows, starting at global row slot ``first_slot`` of the step."""
        B, T = self.micro_batch_size, self.seq_len
        input_ids = np.full((B, T), self.pad_id, dtype=np.int64)
        labels = np.full((B, T), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((B, T), dtype=np.int64)
        seg_lens = []
        for b in range(B):
            slot = first_slot + b
            segs = self._row_segments(layout, int(layout.row_order[slot])) if slot < self.rows_per_epoch else []
            t = 0
            for seg, scored in segs:
                n = len(seg)
                input_ids[b, t : t + n] = seg
                labels[b, t : t + n - 1] = np.where(scored[1:], seg[1:], IGNORE_INDEX)
                positions[b, t : t + n] = np.arange(n)
                seg_lens.append(n)
                t += n
            if t < T:  # padding: its own segment, no targets
                positions[b, t:] = np.arange(T - t)
                seg_lens.append(T - t)
        cu = np.zeros(len(seg_lens) + 1, dtype=np.int32)
        np.cumsum(seg_lens, out=cu[1:])
        return {"input_ids": torch.from_numpy(input_ids), "labels": torch.from_numpy(labels),
                "position_ids": torch.from_numpy(positions), "cu_seqlens": torch.from_numpy(cu),
                "max_seqlen": int(max(seg_lens))}

    # ------------------------------------------------------------------ iteration

    def __len__(self) -> int:
        """Steps (batches per rank) in one epoch."""
        return self.steps_per_epoch

    def _positions(self):
        """(epoch, step) from the current state onwards."""
        epoch, step = self.epoch, self.rows_consumed // self.rows_per_step
        while self.epochs is None or epoch < self.epochs:
            for s in range(step, self.steps_per_epoch):
                yield epoch, s
            epoch, step = epoch + 1, 0

    def _job(self, epoch: int, step: int):
        layout = self._layout(epoch)  # computed in the consumer thread; workers only read it
        return layout, step * self.rows_per_step + self.rank * self.micro_batch_size

    def __iter__(self):
        positions = self._positions()
        if self.num_workers == 0:
            for epoch, step in positions:
                batch = self._build(*self._job(epoch, step))
                self._advance(epoch, step)
                yield batch
            return
        pool = ThreadPoolExecutor(max_workers=self.num_workers, thread_name_prefix="PackedLoader")
        pending: deque = deque()
        try:
            while True:
                while len(pending) < max(self.prefetch, self.num_workers):
                    nxt = next(positions, None)
                    if nxt is None:
                        break
                    pending.append((nxt, pool.submit(self._build, *self._job(*nxt))))
                if not pending:
                    return
                (epoch, step), fut = pending.popleft()
                batch = fut.result()
                self._advance(epoch, step)
                yield batch
        finally:
            pool.shutdown(wait=False, cancel_futures=True)

    def _advance(self, epoch: int, step: int) -> None:
        """State after yielding (epoch, step): the next batch to yield."""
        if step + 1 >= self.steps_per_epoch:
            self.epoch, self.rows_consumed = epoch + 1, 0
        else:
            self.epoch, self.rows_consumed = epoch, (step + 1) * self.rows_per_step

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict:
        """Position of the next batch; identical on every rank, so saving rank 0's is enough."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "rows_consumed": self.rows_consumed,
                "seed": self.seed, "seq_len": self.seq_len, "packed": self.packed, "shuffle": self.shuffle,
                "split": self.split, "num_documents": self.num_documents, "num_tokens": self.num_tokens,
                "rows_per_step": self.rows_per_step}

    def load_state_dict(self, sd: dict) -> None:
        """Resume at ``sd``'s position; ValueError if it came from other data or another stream layout."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')}, expected {STATE_VERSION}")
        for key in ("seed", "seq_len", "packed", "shuffle", "split", "num_documents", "num_tokens"):
            if sd[key] != getattr(self, key):
                raise ValueError(f"loader state has {key}={sd[key]!r} but this loader has {getattr(self, key)!r}; "
                                 f"it cannot resume a different stream")
        if sd["rows_consumed"] % self.rows_per_step:
            raise ValueError(f"loader state is {sd['rows_consumed']} rows into epoch {sd['epoch']}, not a multiple "
                             f"of this loader's {self.rows_per_step} rows per step (world_size x micro_batch_size)")
        self.epoch, self.rows_consumed = int(sd["epoch"]), int(sd["rows_consumed"])
        if self.rows_consumed // self.rows_per_step >= self.steps_per_epoch:
            self.epoch, self.rows_consumed = self.epoch + 1, 0
