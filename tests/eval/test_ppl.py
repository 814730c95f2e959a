"""Perplexity: windows, buckets, and the per-position NLL against the model's own loss."""

import math

import numpy as np
import pytest
import torch

from eval import ppl


def test_windows_concat_and_documents():
    docs = [np.arange(5), np.arange(10, 13), np.arange(20, 28)]
    w = ppl.windows(iter(docs), 4, "concat", 10)
    assert [x.tolist() for x in w] == [[0, 1, 2, 3], [4, 10, 11, 12], [20, 21, 22, 23], [24, 25, 26, 27]]
    assert len(ppl.windows(iter(docs), 4, "concat", 2)) == 2
    w = ppl.windows(iter(docs), 6, "documents", 10)
    assert [x.tolist() for x in w] == [[20, 21, 22, 23, 24, 25]]
    with pytest.raises(ValueError, match="packing"):
        ppl.windows(iter(docs), 4, "sliding", 1)


def test_bucket_edges():
    assert ppl.bucket_edges(9, 4) == [0, 2, 4, 6, 8]
    assert ppl.bucket_edges(3, 16) == [0, 1, 2]  # never more buckets than predicted positions


@pytest.fixture
def val_dir(tmp_path, tiny_lm):
    from data.shards import write_shard

    text = open(__import__("textwrap").__file__).read()
    ids = tiny_lm.tokenizer.encode(text)
    docs = [ids[i: i + 300] for i in range(0, 1800, 300)]
    write_shard(tmp_path / "validation-00000.bin", docs, tiny_lm.tokenizer.vocab_size)
    return tmp_path


def test_run_ppl_matches_model_loss(tiny_lm, val_dir):
    cfg = {"lengths": [128, 512], "packing": "concat", "max_windows": 3, "num_buckets": 4, "batch_size": 2}
    res = ppl.run_ppl(tiny_lm, cfg, val_dir, progress=False)
    r128 = res["lengths"]["128"]
    assert r128["windows"] == 3 and r128["tokens"] == 3 * 127 and len(r128["buckets"]) == 4
    assert math.isclose(r128["ppl"], math.exp(r128["loss"]))
    # the bucket means, weighted by bucket size, give back the overall mean
    sizes = [b["end"] - b["start"] for b in r128["buckets"]]
    pooled = sum(b["loss"] * s for b, s in zip(r128["buckets"], sizes, strict=True)) / sum(sizes)
    assert abs(pooled - r128["loss"]) <= 1e-9 * r128["loss"]
    # against the model's own cross-entropy (labels shifted by one, last position ignored)
    docs = ppl.iter_documents(ppl.shard_paths(val_dir), tiny_lm.tokenizer.bos_id, tiny_lm.tokenizer.eos_id)
    wins = torch.as_tensor(np.stack(ppl.windows(docs, 128, "concat", 3)))
    labels = torch.full_like(wins, -100)
    labels[:, :-1] = wins[:, 1:]
    with torch.no_grad():
        ref = tiny_lm.model(wins, labels=labels).loss.item()
    # fp32 sums over 381 tokens in different orders: relative error ~1e-7, 1e-5 leaves margin
    assert abs(r128["loss"] - ref) / ref < 1e-5
    assert res["lengths"]["512"]["windows"] == 3  # beyond the 512-token training length is allowed too
    assert "| 128 | 3 | 381 |" in ppl.results_markdown(res)


def test_missing_shards_is_an_error(tmp_path, tiny_lm):
    with pytest.raises(ValueError, match="validation"):
        ppl.run_ppl(tiny_lm, {}, tmp_path, progress=False)


def test_shards_of_another_tokenizer_are_an_error(tmp_path, tiny_lm):
    from data.shards import write_shard

    write_shard(tmp_path / "validation-00000.bin", [[5, 6, 7] * 50], 4096)
    with pytest.raises(ValueError, match="vocab"):
        ppl.run_ppl(tiny_lm, {"lengths": [16]}, tmp_path, progress=False)
