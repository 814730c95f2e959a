"""Held-out loss and perplexity, overall and by position bucket, at and beyond the training length.

Windows of ``L`` tokens are cut from the validation shards written by ``data.prepare``
(``<data_dir>/validation-*.bin``), each document framed ``[BOS] doc [EOS]`` as the
training loader does. ``packing: concat`` cuts consecutive windows from the document
stream (positions are window positions, crossing documents); ``packing: documents``
keeps only documents with at least ``L`` tokens and scores their first ``L`` (positions
are document positions: the long-context curve proper). For each ``L`` the mean NLL
of the predicted tokens gives loss and ppl = exp(loss); the NLL at window position
``t`` (predicting token ``t+1``) is averaged in ``num_buckets`` equal position buckets.
"""

from __future__ import annotations

import glob
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch


def shard_paths(data_dir: str | Path, split: str = "validation") -> list[Path]:
    paths = sorted(Path(p) for p in glob.glob(str(Path(data_dir) / f"{split}-*.bin")))
    if not paths:
        raise ValueError(f"no {split}-*.bin shards in {str(data_dir)!r} (write them with `python -m data.prepare`)")
    return paths


def iter_documents(paths: Sequence[Path], bos_id: int, eos_id: int,
                   vocab_size: int | None = None) -> Iterator[np.ndarray]:
    """Every document of the shards as ``[BOS] doc [EOS]`` int64 ids; a shard written with another
    vocabulary size (another tokenizer) is a ValueError."""
    from data.shards import Shard

    for p in paths:
        shard = Shard(p, vocab_size=vocab_size)
        for i in range(len(shard)):
            yield np.concatenate([[bos_id], shard.doc(i).astype(np.int64), [eos_id]])


def windows(docs: Iterator[np.ndarray], length: int, packing: str, max_windows: int) -> list[np.ndarray]:
    """Up to ``max_windows`` windows of exactly ``length`` tokens."""
    if packing not in ("concat", "documents"):
        raise ValueError(f"packing must be 'concat' or 'documents', got {packing!r}")
    out: list[np.ndarray] = []
    buf = np.zeros(0, dtype=np.int64)
    for doc in docs:
        if len(out) >= max_windows:
            break
        if packing == "documents":
            if len(doc) >= length:
                out.append(doc[:length])
            continue
        buf = np.concatenate([buf, doc])
        while len(buf) >= length and len(out) < max_windows:
            out.append(buf[:length])
            buf = buf[length:]
    return out


def bucket_edges(length: int, num_buckets: int) -> list[int]:
    """Edges of ``num_buckets`` equal buckets over the ``length - 1`` predicted positions."""
    if length < 2 or num_buckets < 1:
        raise ValueError(f"need length >= 2 and num_buckets >= 1, got {length}, {num_buckets}")
    n = min(num_buckets, length - 1)
    return [round(i * (length - 1) / n) for i in range(n + 1)]


def evaluate_length(lm, wins: Sequence[np.ndarray], num_buckets: int, batch_size: int = 1,
                    progress: bool = False, desc: str = "ppl") -> dict:
    """Loss, ppl and per-bucket loss/ppl over windows of one length."""
    from tqdm.auto import tqdm

    if not wins:
        return {"windows": 0, "tokens": 0, "loss": None, "ppl": None, "buckets": []}
    length = len(wins[0])
    sum_pos = torch.zeros(length - 1, dtype=torch.float64)
    for s in tqdm(range(0, len(wins), batch_size), disable=not progress, desc=desc):
        batch = torch.as_tensor(np.stack(wins[s: s + batch_size]), device=lm.device)
        sum_pos += lm.token_nll(batch).double().sum(0).cpu()
    n = len(wins)
    loss = float(sum_pos.sum() / (n * (length - 1)))
    edges = bucket_edges(length, num_buckets)
    buckets = []
    for a, b in zip(edges[:-1], edges[1:], strict=True):
        bl = float(sum_pos[a:b].sum() / (n * (b - a)))
        buckets.append({"start": a, "end": b, "loss": bl, "ppl": math.exp(bl)})
    return {"windows": n, "tokens": n * (length - 1), "loss": loss, "ppl": math.exp(loss), "buckets": buckets}


def run_ppl(lm, cfg: Mapping, data_dir: str | Path, progress: bool = True) -> dict:
    """Evaluate every length in ``cfg.lengths`` (None: the model's max_seq_len and 2x, 4x of it)."""
    train_len = int(cfg.get("train_length") or lm.max_length)
    lengths = [int(x) for x in (cfg.get("lengths") or [train_len, 2 * train_len, 4 * train_len])]
    paths = shard_paths(data_dir, cfg.get("split", "validation"))
    results = {"data_dir": str(data_dir), "train_length": train_len, "packing": cfg.get("packing", "concat"),
               "lengths": {}}
    for length in lengths:
        docs = iter_documents(paths, lm.tokenizer.bos_id, lm.tokenizer.eos_id, lm.tokenizer.vocab_size)
        wins = windows(docs, length, results["packing"], int(cfg.get("max_windows", 64)))
        results["lengths"][str(length)] = evaluate_length(
            lm, wins, int(cfg.get("num_buckets", 16)), int(cfg.get("batch_size", 1)), progress, f"ppl@{length}")
    return results


def results_markdown(results: Mapping) -> str:
    from eval.io import markdown_table

    rows = [[L, r["windows"], r["tokens"], r["loss"], r["ppl"]] for L, r in results["lengths"].items()]
    text = (f"# Perplexity ({results['packing']} windows, training length {results['train_length']})\n\n"
            + markdown_table(["length", "windows", "tokens", "loss", "ppl"], rows, digits=4))
    for L, r in results["lengths"].items():
        if r["buckets"]:
            text += f"\n## Loss by position, length {L}\n\n" + markdown_table(
                ["positions", "loss", "ppl"], [[f"{b['start']}-{b['end']}", b["loss"], b["ppl"]] for b in r["buckets"]], 4)
    return text
