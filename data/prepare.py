"""Tokenise a source into train/validation shards: ``python -m data.prepare data=... tokenizer=...``.

Output directory (default ``outputs/data/<data name>-<tokenizer name>``)::

    meta.json              format version, config hash, tokenizer sha256 + ids, split sizes, shard names
    tokenizer.model        copy of the tokenizer used
    train-00000.bin ...    shards (see data.shards)
    validation-00000.bin

The split is by documents, from a permutation seeded by ``data.seed``; the result is
deterministic for a config and tokenizer. ``meta.json`` is written last: when it exists,
its config hash matches and every shard opens cleanly, a second run does nothing.
"""

from __future__ import annotations

import hashlib
import json
import platform
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from data.shards import FORMAT_VERSION, Shard, ShardWriter
from data.sources import NO_LOSS, DataConfig, data_config_from_dict, load_documents, to_plain
from data.tokenizer import Tokenizer, TokenizerConfig, get_tokenizer, tokenizer_config_from_dict

SPLITS = ("train", "validation")
_WORKER_TOKENIZERS: dict[str, Tokenizer] = {}


def default_out_dir(dcfg: DataConfig, tcfg: TokenizerConfig) -> Path:
    return Path(dcfg.out_dir) if dcfg.out_dir else Path("outputs/data") / f"{dcfg.name}-{tcfg.name}"


def _content_config(data: dict) -> dict:
    """A plain data config without the settings that do not change the shards (num_proc, out_dir)."""
    return {k: v for k, v in data.items() if k not in ("num_proc", "out_dir")}


def reads_pystdlib(source) -> bool:
    """Whether a plain source config (or a mixture of them) reads the pystdlib corpus."""
    if isinstance(source, dict):
        return source.get("kind") == "pystdlib" or any(reads_pystdlib(v) for v in source.values())
    if isinstance(source, list):
        return any(reads_pystdlib(x) for x in source)
    return False


def config_hash(dcfg: DataConfig, tok: Tokenizer | str) -> str:
    """Hash of everything that changes the shards' content (not num_proc or out_dir);
    ``tok`` is the tokenizer or its sha256. For a source that reads the pystdlib corpus the
    Python version is part of it (the corpus is the running interpreter's standard library)."""
    d = _content_config(to_plain(dcfg))
    sha = tok if isinstance(tok, str) else tok.sha256
    what = {"data": d, "tokenizer_sha256": sha, "format": FORMAT_VERSION}
    if reads_pystdlib(d["source"]):
        what["python"] = platform.python_version()
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()


def split_documents(n_docs: int, dcfg: DataConfig) -> dict[str, np.ndarray]:
    """Sorted document indices per split; ValueError when the source is empty or too small."""
    if n_docs == 0:
        raise ValueError(f"data source {dcfg.name!r} produced no documents")
    n_val = 0
    if dcfg.validation_fraction > 0:
        n_val = max(dcfg.min_validation_documents, round(dcfg.validation_fraction * n_docs))
    if n_val >= n_docs:
        raise ValueError(f"data source {dcfg.name!r} has {n_docs} documents, too few for {n_val} validation "
                         f"documents plus at least one training document (validation_fraction="
                         f"{dcfg.validation_fraction}, min_validation_documents={dcfg.min_validation_documents})")
    perm = np.random.default_rng(dcfg.seed).permutation(n_docs)
    return {"train": np.sort(perm[n_val:]), "validation": np.sort(perm[:n_val])}


def _encode(batch: dict, model_path: str, sha256: str) -> dict:
    """datasets.map worker: text -> ids (one tokenizer per process).

    ``sha256`` is unused here but part of datasets' cache fingerprint, so a tokenizer
    retrained at the same path never reuses a stale cached tokenisation.
    """
    del sha256
    tok = _WORKER_TOKENIZERS.get(model_path)
    if tok is None:
        tok = _WORKER_TOKENIZERS[model_path] = Tokenizer(model_path)
    if NO_LOSS not in batch:
        return {"ids": tok.encode_batch(batch["text"])}
    ids, scored = zip(*(tok.encode_scored(t, spans) for t, spans in zip(batch["text"], batch[NO_LOSS],
                                                                         strict=True)), strict=True)
    return {"ids": list(ids), "scored": list(scored)}


def stale_preparation(out: Path, dcfg: DataConfig) -> str | None:
    """Why the preparation in ``out`` does not match ``dcfg`` (None if it does, or if ``out``
    holds no hashed preparation, e.g. shards written by hand). Uses the tokenizer sha256
    recorded in ``meta.json``, so it never loads or trains a tokenizer."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    sha, have = meta.get("tokenizer", {}).get("sha256"), meta.get("config_hash")
    if not sha or not have:
        return None
    want = config_hash(dcfg, sha)
    if want == have:
        return None
    plain = to_plain(dcfg)
    def canonical(data: dict) -> str:
        return json.dumps(_content_config(data), sort_keys=True, default=str)

    same = canonical(meta.get("data") or {}) == canonical(plain)
    if same and meta.get("format_version") == FORMAT_VERSION:  # the interpreter, not the config, changed
        if not reads_pystdlib(plain["source"]):
            return None  # (a preparation hashed with the Python version before it counted only for pystdlib)
        return (f"{out} was prepared under Python {meta.get('python', '(another version)')}, whose standard "
                f"library is the pystdlib corpus; this is Python {platform.python_version()}: delete {out} to "
                f"prepare it again, or name it with data.out_dir to use it as it is")
    return (f"{out} was prepared from another data config (hash {have[:12]}, this config {want[:12]}): "
            f"give this config its own data.name (or data.out_dir), or delete {out} to prepare it again")


def is_prepared(out: Path, chash: str, vocab_size: int) -> bool:
    """True when ``out`` holds a finished preparation for this config hash with intact shards."""
    meta_path = out / "meta.json"
    if not meta_path.is_file():
        return False
    meta = json.loads(meta_path.read_text())
    if meta.get("config_hash") != chash:
        return False
    try:
        for info in meta["splits"].values():
            for name in info["shards"]:
                Shard(out / name, vocab_size)
    except (ValueError, KeyError):
        return False
    return True


def _write_split(tokenized, idx: np.ndarray, out: Path, split: str, vocab_size: int,
                 max_tokens: int) -> dict:
    from tqdm.auto import tqdm

    shards, writer, n_tok = [], None, 0
    masked = "scored" in tokenized.column_names
    bar = tqdm(total=len(idx), desc=f"write {split}", unit="doc")
    for start in range(0, len(idx), 1000):
        chunk = tokenized.select(idx[start : start + 1000])
        rows = chunk["ids"]
        scored = chunk["scored"] if masked else [None] * len(rows)
        for ids, sc in zip(rows, scored, strict=True):
            if writer is None:
                writer = ShardWriter(out / f"{split}-{len(shards):05d}.bin", vocab_size, with_loss_mask=masked)
            writer.add(ids, sc)
            n_tok += len(ids)
            if writer.num_tokens >= max_tokens:
                shards.append(writer.close().name)
                writer = None
        bar.update(len(rows))
    bar.close()
    if writer is not None:
        shards.append(writer.close().name)
    return {"documents": int(len(idx)), "tokens": int(n_tok), "shards": shards}


@contextmanager
def exclusive(out: Path) -> Iterator[None]:
    """Hold an exclusive lock on ``out`` (a file ``.<name>.lock`` beside it) for as long as the block
    runs. Runs started together, e.g. the NSA and full-attention jobs of one comparison, then
    prepare a directory once: the second waits and finds it up to date instead of deleting the
    shards the first is writing. A no-op where ``fcntl`` is missing (Windows)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare(data_cfg, tok_cfg, out_dir: str | Path | None = None, *, force: bool = False, log=print) -> Path:
    """Tokenise ``data_cfg``'s source with ``tok_cfg``'s tokenizer into shards; returns the output dir.
    Holds :func:`exclusive` on the output dir while it checks and writes."""
    dcfg = data_cfg if isinstance(data_cfg, DataConfig) else data_config_from_dict(data_cfg)
    tcfg = tok_cfg if isinstance(tok_cfg, TokenizerConfig) else tokenizer_config_from_dict(tok_cfg)
    if dcfg.shard_max_tokens <= 0:
        raise ValueError(f"shard_max_tokens must be > 0, got {dcfg.shard_max_tokens}")
    out = Path(out_dir) if out_dir else default_out_dir(dcfg, tcfg)
    with exclusive(out):
        return _prepare(dcfg, tcfg, out, force, log)


def _prepare(dcfg: DataConfig, tcfg: TokenizerConfig, out: Path, force: bool, log) -> Path:
    tok = get_tokenizer(tcfg, dcfg, log=log)
    chash = config_hash(dcfg, tok)
    if not force and is_prepared(out, chash, tok.vocab_size):
        log(f"{out} is up to date (config hash {chash[:12]}), nothing to do")
        return out

    stale = stale_preparation(out, dcfg)
    if stale:  # an explicit prepare replaces it; the trainer would have refused it (see stale_preparation)
        log(f"warning: replacing {out}: {stale.split(':')[0]}")
    docs = load_documents(dcfg.source)
    splits = split_documents(len(docs), dcfg)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [out / "meta.json", *out.glob("*.bin"), *out.glob("*.bin.tmp")]:
        stale.unlink(missing_ok=True)
    log(f"tokenising {len(docs)} documents of {dcfg.name} with {Path(tok.path).name} -> {out}")
    tokenized = docs.map(_encode, batched=True, batch_size=64, num_proc=max(1, min(dcfg.num_proc, len(docs))),
                         fn_kwargs={"model_path": tok.path, "sha256": tok.sha256}, remove_columns=docs.column_names,
                         desc="tokenise")
    meta_splits = {s: _write_split(tokenized, splits[s], out, s, tok.vocab_size, dcfg.shard_max_tokens)
                   for s in SPLITS}
    shutil.copyfile(tok.path, out / "tokenizer.model")
    meta = {
        "format_version": FORMAT_VERSION, "config_hash": chash, "name": dcfg.name,
        "data": to_plain(dcfg), "seed": dcfg.seed,
        "tokenizer": {"file": "tokenizer.model", "source_path": str(tok.path), "sha256": tok.sha256,
                      "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
                      "pad_id": tok.pad_id},
        "vocab_size": tok.vocab_size, "splits": meta_splits, "python": platform.python_version(),
    }
    tmp = out / "meta.json.tmp"
    tmp.write_text(json.dumps(meta, indent=2, default=str))
    tmp.replace(out / "meta.json")
    log(f"wrote {out}: " + ", ".join(f"{s} {m['documents']} docs / {m['tokens']} tokens"
                                     for s, m in meta_splits.items()))
    return out


def main(argv: list[str] | None = None) -> None:
    """``python -m data.prepare data=<source> tokenizer=<name> [out_dir=...] [force=true]``."""
    from data.cli import compose

    cfg = compose(argv, "python -m data.prepare", "Tokenise a data source into train/validation shards.",
                  extra={"out_dir": None, "force": False})
    prepare(cfg.data, cfg.tokenizer, cfg.out_dir, force=cfg.force)


if __name__ == "__main__":
    main()
