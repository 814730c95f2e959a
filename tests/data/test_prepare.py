"""prepare: text -> tokenizer -> shards -> text, splits, determinism, skipping finished work, errors."""

import json

import numpy as np
import pytest

from data.loader import PackedLoader
from data.prepare import main, prepare, stale_preparation
from data.shards import Shard
from data.sources import (
    MixtureSource,
    PyStdlibSource,
    SyntheticSource,
    data_config_from_dict,
    load_documents,
    source_from_dict,
    stdlib_files,
)
from data.tokenizer import Tokenizer, get_tokenizer

TEXTS = [f"doc {i}: " + "x = {}\n\tprint('héllo ✓', x)\n".format(i) * (1 + i % 7) for i in range(30)]


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": t}) + "\n" for i, t in enumerate(TEXTS)))
    return path


def data_cfg(path, **kw):
    return {"name": "toy", "source": {"kind": "local", "data_files": str(path), "text_field": "body"},
            "validation_fraction": 0.2, "seed": 0, "num_proc": 2, **kw}


def tok_cfg(tokenizer):
    return {"name": "t512", "path": tokenizer.path, "vocab_size": tokenizer.vocab_size}


def decoded(out, split, tok):
    meta = json.loads((out / "meta.json").read_text())
    shards = [Shard(out / n, tok.vocab_size) for n in meta["splits"][split]["shards"]]
    return [tok.decode(s.doc(i)) for s in shards for i in range(len(s))]


def test_round_trip_through_shards(tmp_path, jsonl, tokenizer):
    out = prepare(data_cfg(jsonl, shard_max_tokens=300), tok_cfg(tokenizer), tmp_path / "out")
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / "tokenizer.model")
    assert tok.sha256 == tokenizer.sha256 == meta["tokenizer"]["sha256"]
    train, val = decoded(out, "train", tok), decoded(out, "validation", tok)
    assert len(val) == 6 and len(train) == 24
    assert sorted(train + val) == sorted(TEXTS), "every document comes back exactly, in exactly one split"
    assert len(meta["splits"]["train"]["shards"]) > 1, "shard_max_tokens splits the train set into shards"
    assert meta["splits"]["train"]["tokens"] == sum(len(tok.encode(t)) for t in train)
    loader = PackedLoader(out, split="validation", seq_len=32, micro_batch_size=1, vocab_size=512)
    assert loader.num_documents == 6 and loader.tokenizer_path == str(out / "tokenizer.model")


def test_deterministic_and_seeded(tmp_path, jsonl, tokenizer):
    a = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "a")
    b = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "b")
    c = prepare(data_cfg(jsonl, seed=1), tok_cfg(tokenizer), tmp_path / "c")
    for name in ("train-00000.bin", "validation-00000.bin"):
        assert (a / name).read_bytes() == (b / name).read_bytes()
    assert (a / "validation-00000.bin").read_bytes() != (c / "validation-00000.bin").read_bytes()


def test_second_run_skips_and_config_change_redoes(tmp_path, jsonl, tokenizer):
    logs = []
    out = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "o", log=logs.append)
    mtime = (out / "train-00000.bin").stat().st_mtime_ns
    prepare(data_cfg(jsonl, num_proc=1), tok_cfg(tokenizer), out, log=logs.append)
    assert "up to date" in logs[-1] and (out / "train-00000.bin").stat().st_mtime_ns == mtime
    prepare(data_cfg(jsonl, validation_fraction=0.5), tok_cfg(tokenizer), out, log=logs.append)
    assert json.loads((out / "meta.json").read_text())["splits"]["validation"]["documents"] == 15
    # a damaged shard is noticed and rebuilt
    (out / "train-00000.bin").write_bytes(b"junk")
    prepare(data_cfg(jsonl, validation_fraction=0.5), tok_cfg(tokenizer), out, log=logs.append)
    assert "up to date" not in logs[-1]
    Shard(out / "train-00000.bin", 512)


def test_stale_preparation_names_the_mismatch(tmp_path, jsonl, tokenizer):
    """What the trainer checks before reusing shards: same config -> None, a changed source or
    split -> a message naming the directory, hand-written shards (no hash) -> None."""
    out = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "o")
    assert stale_preparation(out, data_config_from_dict(data_cfg(jsonl, num_proc=1))) is None
    msg = stale_preparation(out, data_config_from_dict(data_cfg(jsonl, validation_fraction=0.5)))
    assert msg and str(out) in msg and "data.name" in msg
    assert stale_preparation(tmp_path / "missing", data_config_from_dict(data_cfg(jsonl))) is None
    meta = json.loads((out / "meta.json").read_text())
    del meta["config_hash"]
    (out / "meta.json").write_text(json.dumps(meta))
    assert stale_preparation(out, data_config_from_dict(data_cfg(jsonl, validation_fraction=0.5))) is None


def test_python_version_matters_only_for_the_pystdlib_corpus(tmp_path, jsonl, tokenizer, monkeypatch):
    """Another interpreter: local text is still the same data (not stale, not re-prepared); the
    pystdlib corpus is another corpus, and the message says so rather than blaming the config."""
    import data.prepare as prep

    local = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "local")
    std_cfg = {"name": "std", "source": {"kind": "pystdlib", "max_documents": 20}, "validation_fraction": 0.2,
               "num_proc": 1}
    std = prepare(std_cfg, tok_cfg(tokenizer), tmp_path / "std")
    assert json.loads((std / "meta.json").read_text())["python"] == prep.platform.python_version()
    monkeypatch.setattr(prep.platform, "python_version", lambda: "3.99.0")
    assert stale_preparation(local, data_config_from_dict(data_cfg(jsonl))) is None
    logs = []
    prepare(data_cfg(jsonl), tok_cfg(tokenizer), local, log=logs.append)
    assert "up to date" in logs[-1]
    msg = stale_preparation(std, data_config_from_dict(std_cfg))
    assert msg and "Python" in msg and "3.99.0" in msg and "another data config" not in msg
    mixed = dict(std_cfg, source={"kind": "mixture", "components": [{"weight": 1.0, "source": std_cfg["source"]}]})
    assert prep.reads_pystdlib(prep.to_plain(data_config_from_dict(mixed))["source"])
    assert not prep.reads_pystdlib(prep.to_plain(data_config_from_dict(data_cfg(jsonl)))["source"])


def test_prepare_warns_when_it_replaces_another_config(tmp_path, jsonl, tokenizer):
    out = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "o")
    logs = []
    prepare(data_cfg(jsonl, validation_fraction=0.5), tok_cfg(tokenizer), out, log=logs.append)
    assert any(line.startswith(f"warning: replacing {out}") for line in logs)


def test_empty_and_too_small_sources(tmp_path, tokenizer):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"body": ""}\n{"body": ""}\n')
    with pytest.raises(ValueError, match="'toy' produced no documents"):
        prepare(data_cfg(empty), tok_cfg(tokenizer), tmp_path / "e")
    two = tmp_path / "two.jsonl"
    two.write_text('{"body": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match="has 2 documents, too few for 2 validation"):
        prepare(data_cfg(two, min_validation_documents=2), tok_cfg(tokenizer), tmp_path / "s")


def test_config_errors(tmp_path, jsonl, tokenizer):
    with pytest.raises(ValueError, match="no text field 'text'"):
        prepare(data_cfg(jsonl) | {"source": {"kind": "local", "data_files": str(jsonl)}},
                tok_cfg(tokenizer), tmp_path / "x")
    with pytest.raises(ValueError, match="unknown data source kind 'ftp'"):
        source_from_dict({"kind": "ftp"})
    with pytest.raises(ValueError, match=r"unknown keys \['colour'\]"):
        source_from_dict({"kind": "pystdlib", "colour": "red"})
    with pytest.raises(ValueError, match="tokenizer .* does not exist and no data source"):
        get_tokenizer({"name": "nope", "path": str(tmp_path / "nope.model")})


def test_vocab_mismatch_on_load(tmp_path, jsonl, tokenizer):
    out = prepare(data_cfg(jsonl), tok_cfg(tokenizer), tmp_path / "v")
    with pytest.raises(ValueError, match="vocab_size 512, expected 4096"):
        PackedLoader(out, seq_len=32, micro_batch_size=1, vocab_size=4096)


def test_pystdlib_selection():
    lib = stdlib_files(PyStdlibSource())
    tests = stdlib_files(PyStdlibSource(tests="only"))
    assert len(lib) > 500 and len(tests) > 100
    assert not set(lib) & set(tests)
    assert all("site-packages" not in p.parts for p in lib)
    assert any(p.name == "argparse.py" for p in lib) and not any(p.name == "argparse.py" for p in tests)
    assert stdlib_files(PyStdlibSource(max_documents=5)) == lib[:5]


def test_pystdlib_subset_prepare_and_cli(tmp_path, tokenizer, capsys):
    args = ["data=pystdlib", "data.source.max_documents=12", "data.validation_fraction=0.2",
            f"tokenizer.path={tokenizer.path}", "tokenizer.vocab_size=512",
            f"out_dir={tmp_path / 'std'}"]
    main(args)
    meta = json.loads((tmp_path / "std" / "meta.json").read_text())
    texts = list(load_documents(PyStdlibSource(max_documents=12))["text"])
    assert meta["splits"]["train"]["documents"] + meta["splits"]["validation"]["documents"] == len(texts)
    assert sorted(decoded(tmp_path / "std", "train", tokenizer) + decoded(tmp_path / "std", "validation", tokenizer)) \
        == sorted(texts)
    main(args)
    assert "up to date" in capsys.readouterr().out


def test_mixture_source(tmp_path, jsonl):
    src = source_from_dict({"kind": "mixture", "stopping": "all_exhausted", "components": [
        {"weight": 3, "source": {"kind": "local", "data_files": str(jsonl), "text_field": "body"}},
        {"weight": 1, "source": {"kind": "synthetic", "task": "passkey", "num_documents": 10,
                                 "min_filler_chars": 100, "max_filler_chars": 200}}]})
    assert isinstance(src, MixtureSource) and isinstance(src.components[1].source, SyntheticSource)
    docs = list(load_documents(src)["text"])
    n_pass = sum("pass key" in d for d in docs)
    assert set(TEXTS) <= set(docs) and n_pass >= 10, "all_exhausted sees every document of both"
    assert np.mean(["pass key" in d for d in docs]) < 0.5, "the heavier source dominates"
    with pytest.raises(ValueError, match="weights must be > 0"):
        source_from_dict({"kind": "mixture", "components": [{"weight": 0, "source": {"kind": "pystdlib"}}]})


def test_local_text_and_parquet_formats(tmp_path):
    import datasets

    for i, t in enumerate(TEXTS[:3]):
        (tmp_path / f"f{i}.txt").write_text(t)
    docs = load_documents(source_from_dict({"kind": "local", "data_files": str(tmp_path / "*.txt")}))
    assert sorted(docs["text"]) == sorted(TEXTS[:3]), "a text file is one document, whitespace kept"
    datasets.Dataset.from_dict({"content": TEXTS[:4]}).to_parquet(str(tmp_path / "d.parquet"))
    docs = load_documents(source_from_dict({"kind": "local", "data_files": str(tmp_path / "d.parquet"),
                                            "text_field": "content"}))
    assert list(docs["text"]) == TEXTS[:4]


def test_existing_tokenizer_with_other_vocab_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="has vocab_size 512 but tokenizer 'x' asks for 4096"):
        get_tokenizer({"name": "x", "path": tokenizer.path, "vocab_size": 4096})
    assert get_tokenizer({"name": "x", "path": tokenizer.path, "vocab_size": None}).vocab_size == 512


def test_retrained_tokenizer_at_same_path_is_not_served_from_cache(tmp_path, jsonl, stdlib_texts):
    """datasets caches map() results of file-backed data; the tokenizer's hash is part of that key."""
    from data.tokenizer import train_tokenizer

    path = tmp_path / "tok.model"
    for i, vocab in enumerate((400, 700)):
        tok = train_tokenizer(stdlib_texts[:10], path, vocab_size=vocab, input_sentence_size=200)
        cfg = {"name": "re", "path": str(path), "vocab_size": vocab}
        out = prepare(data_cfg(jsonl, validation_fraction=0.0), cfg, tmp_path / f"o{i}")
        shard = Shard(out / "train-00000.bin", tok.vocab_size)
        assert [list(shard.doc(j)) for j in range(len(shard))] == [tok.encode(t) for t in TEXTS]


def test_every_shipped_config_parses():
    """configs/data/*.yaml and configs/tokenizer/*.yaml compose through Hydra and fit the schema."""
    from data.cli import CONFIG_DIR, compose
    from data.sources import data_config_from_dict
    from data.tokenizer import tokenizer_config_from_dict

    names = sorted(p.stem for p in (CONFIG_DIR / "data").glob("*.yaml"))
    assert {"pystdlib", "local", "fineweb_edu", "pystdlib_longctx"} <= set(names)
    for name in names:
        overrides = [f"data={name}"] + (["data.source.data_files=x.jsonl"] if name == "local" else [])
        cfg = compose(overrides, "test", "")
        assert data_config_from_dict(cfg.data).name == name
    for p in (CONFIG_DIR / "tokenizer").glob("*.yaml"):
        assert tokenizer_config_from_dict(compose([f"tokenizer={p.stem}"], "test", "").tokenizer).name == p.stem
    mix = data_config_from_dict(compose(["data=pystdlib_longctx"], "test", "").data).source
    assert [c.source.kind for c in mix.components] == ["pystdlib", "synthetic", "synthetic"]


def _prepare_in_process(args):
    data, tok, out = args
    logs = []
    prepare(data, tok, out, log=logs.append)
    return logs[-1]


def test_runs_started_together_prepare_once(tmp_path, jsonl, tokenizer):
    """Two processes preparing one directory at the same time (the NSA and full-attention jobs of a
    comparison): one writes it, the other waits for it and finds it up to date (without the lock the
    second deleted the first one's shards mid-write: FileNotFoundError on its rename)."""
    import multiprocessing as mp

    out = tmp_path / "shared"
    args = (data_cfg(jsonl, num_proc=1), tok_cfg(tokenizer), out)
    with mp.get_context("spawn").Pool(2) as pool:
        logs = pool.map(_prepare_in_process, [args, args])
    assert sum("up to date" in line for line in logs) == 1, logs
    tok = Tokenizer.load(out / "tokenizer.model")
    assert sorted(decoded(out, "train", tok) + decoded(out, "validation", tok)) == sorted(TEXTS)
