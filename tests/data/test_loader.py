"""PackedLoader: packing boundaries, cu_seqlens/positions/labels, ranks, determinism, resume."""

import json
import threading

import numpy as np
import pytest
import torch

from data.loader import IGNORE_INDEX, PackedLoader
from data.shards import write_shard

BOS, EOS, PAD = 1, 2, 3
IDS = {"bos_id": BOS, "eos_id": EOS, "pad_id": PAD}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two shards of 60 documents with ids >= 4 (never a special id); some longer than a row."""
    rng = np.random.default_rng(1)
    lengths = list(rng.integers(1, 50, size=55)) + [130, 200, 64, 63, 62]
    docs = [rng.integers(4, 1000, size=int(n)) for n in lengths]
    root = tmp_path_factory.mktemp("shards")
    paths = [write_shard(root / "train-00000.bin", docs[:25], 1000),
             write_shard(root / "train-00001.bin", docs[25:], 1000)]
    return paths, docs


def make(corpus, **kw):
    kw = {"seq_len": 64, "micro_batch_size": 2, "num_workers": 0, **IDS, **kw}
    return PackedLoader(corpus[0], **kw)


def segments(batch):
    """(input, labels, positions) per cu_seqlens segment of the flattened batch."""
    flat = [batch[k].reshape(-1) for k in ("input_ids", "labels", "position_ids")]
    cu = batch["cu_seqlens"].tolist()
    return [tuple(x[a:b] for x in flat) for a, b in zip(cu[:-1], cu[1:], strict=True)]


def stream(docs):
    return np.concatenate([np.concatenate([[BOS], d, [EOS]]) for d in docs])


def take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_batch_contract(corpus):
    b = next(iter(make(corpus)))
    assert set(b) == {"input_ids", "labels", "position_ids", "cu_seqlens", "max_seqlen"}
    assert b["input_ids"].shape == b["labels"].shape == b["position_ids"].shape == (2, 64)
    assert b["input_ids"].dtype == b["labels"].dtype == torch.long and b["cu_seqlens"].dtype == torch.int32
    cu = b["cu_seqlens"]
    assert cu[0] == 0 and cu[-1] == 128 and torch.all(cu[1:] > cu[:-1])
    assert 64 in cu.tolist(), "row boundaries are always segment boundaries"
    assert b["max_seqlen"] == int((cu[1:] - cu[:-1]).max())


def test_packing_reconstructs_the_stream(corpus):
    """Unshuffled, one epoch, no dropping: concatenating the non-padding segments gives back
    [BOS] doc [EOS] for every document in order; each segment has positions 0..n-1 and
    labels equal to the next input inside the segment, -100 at its end."""
    loader = make(corpus, shuffle=False, drop_last=False, epochs=1)
    pieces, n_pad_rows = [], 0
    for b in loader:
        for inp, lab, pos in segments(b):
            assert torch.equal(pos, torch.arange(len(inp)))
            if torch.all(inp == PAD):
                assert torch.all(lab == IGNORE_INDEX)
                n_pad_rows += 1
                continue
            assert torch.equal(lab[:-1], inp[1:]) and lab[-1] == IGNORE_INDEX
            assert not torch.any(inp == PAD)
            pieces.append(inp.numpy())
    np.testing.assert_array_equal(np.concatenate(pieces), stream(corpus[1]))
    assert n_pad_rows >= 1  # the last, partial row is padded when drop_last=False


def test_documents_start_with_bos_end_with_eos(corpus):
    """In shuffled packing every BOS starts a segment and every EOS ends one (boundaries from the index)."""
    for b in take(make(corpus), 10):
        for inp, _, _ in segments(b):
            bos = (inp == BOS).nonzero().flatten().tolist()
            eos = (inp == EOS).nonzero().flatten().tolist()
            assert bos in ([], [0]) and eos in ([], [len(inp) - 1])


def test_long_documents_split_into_pieces(corpus):
    docs = corpus[1]
    loader = make(corpus, shuffle=False, drop_last=False, epochs=1)
    seg_lens = [len(s[0]) for b in loader for s in segments(b)]
    assert max(seg_lens) <= 64
    assert sum(seg_lens) >= len(stream(docs))
    assert len(docs[56]) + 2 > 64  # the 200-token document cannot fit a row, so it was split


def test_unpacked_one_document_per_row(corpus):
    docs = corpus[1]
    loader = make(corpus, packed=False, shuffle=False, epochs=1, micro_batch_size=3)
    rows = [row for b in loader for row in zip(b["input_ids"], b["labels"], b["position_ids"], strict=True)]
    assert len(rows) == 60  # 60 documents, 20 steps of 3 rows
    for (inp, lab, pos), d in zip(rows, docs, strict=True):
        full = np.concatenate([[BOS], d, [EOS]])[:64]  # cropped to seq_len
        n = len(full)
        np.testing.assert_array_equal(inp[:n].numpy(), full)
        assert torch.all(inp[n:] == PAD) and torch.all(lab[n - 1 :] == IGNORE_INDEX)
        assert torch.equal(pos[:n], torch.arange(n))
    b = next(iter(make(corpus, packed=False, shuffle=False, micro_batch_size=1)))
    n = len(docs[0]) + 2
    assert b["cu_seqlens"].tolist() == [0, n, 64]


def test_ranks_disjoint_and_covering(corpus):
    """Three ranks over one epoch: every stream token appears exactly once across ranks."""
    docs = corpus[1]
    tokens = []
    steps = set()
    for rank in range(3):
        loader = make(corpus, rank=rank, world_size=3, drop_last=False, epochs=1)
        steps.add(len(loader))
        for b in loader:
            inp = b["input_ids"].reshape(-1)
            tokens.append(inp[inp != PAD].numpy())
    assert len(steps) == 1, "every rank takes the same number of steps"
    np.testing.assert_array_equal(np.sort(np.concatenate(tokens)), np.sort(stream(docs)))


def test_step_content_independent_of_world_size(corpus):
    """Step s covers the same global rows whatever the split into ranks and micro-batches."""
    single = take(make(corpus, micro_batch_size=4), 3)
    for s in range(3):
        parts = [take(make(corpus, rank=r, world_size=2, micro_batch_size=2), s + 1)[s] for r in range(2)]
        assert torch.equal(torch.cat([p["input_ids"] for p in parts]), single[s]["input_ids"])


def test_deterministic_for_seed_and_epochs_reshuffle(corpus):
    a, b, c = (take(make(corpus, seed=s), 3) for s in (0, 0, 1))
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, b, strict=True))
    assert not all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(a, c, strict=True))
    loader = make(corpus, epochs=2)
    n = len(loader)
    batches = list(loader)
    assert len(batches) == 2 * n
    first = torch.cat([x["input_ids"] for x in batches[:n]])
    second = torch.cat([x["input_ids"] for x in batches[n:]])
    assert not torch.equal(first, second)


def _assert_same(xs, ys):
    assert len(xs) == len(ys)
    for x, y in zip(xs, ys, strict=True):
        for k in ("input_ids", "labels", "position_ids", "cu_seqlens"):
            assert torch.equal(x[k], y[k]), k
        assert x["max_seqlen"] == y["max_seqlen"]


@pytest.mark.parametrize("before,after", [
    ({"num_workers": 0}, {"num_workers": 2, "prefetch": 4}),
    ({"num_workers": 1, "prefetch": 3}, {"num_workers": 0}),
])
def test_resume_equals_uninterrupted(corpus, before, after):
    """Stop after 5 batches (an epoch has 7, so the run crosses an epoch boundary), save the state
    through JSON as a checkpoint would, resume with other prefetch/worker settings."""
    full = take(make(corpus, micro_batch_size=4, num_workers=1), 12)
    first = make(corpus, micro_batch_size=4, **before)
    assert len(first) < 12
    head = take(first, 5)
    state = json.loads(json.dumps(first.state_dict()))
    second = make(corpus, micro_batch_size=4, **after)
    second.load_state_dict(state)
    _assert_same(head + take(second, 7), full)


def test_resume_with_other_micro_batch_size(corpus):
    """Gradient accumulation changes (4 rows x 1 -> 2 rows x 2) keep the row stream."""
    full = take(make(corpus, micro_batch_size=2), 8)
    first = make(corpus, micro_batch_size=4)
    take(first, 2)
    second = make(corpus, micro_batch_size=2)
    second.load_state_dict(first.state_dict())
    _assert_same(full[4:8], take(second, 4))


def test_state_mismatch_errors(corpus):
    state = make(corpus).state_dict()
    with pytest.raises(ValueError, match="seed=0 but this loader has 1"):
        make(corpus, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_len"):
        make(corpus, seq_len=32).load_state_dict(state)
    first = make(corpus, micro_batch_size=2)
    take(first, 1)
    with pytest.raises(ValueError, match="not a multiple"):
        make(corpus, micro_batch_size=4).load_state_dict(first.state_dict())


def test_prefetch_runs_in_background_thread(corpus, monkeypatch):
    names = []
    build = PackedLoader._build

    def spy(self, *a):
        names.append(threading.current_thread().name)
        return build(self, *a)

    monkeypatch.setattr(PackedLoader, "_build", spy)
    take(make(corpus, num_workers=1, prefetch=2), 3)
    assert names and all(n.startswith("PackedLoader") for n in names)
    names.clear()
    take(make(corpus, num_workers=0), 2)
    assert names == [threading.main_thread().name] * 2


def test_bad_arguments_and_small_data(corpus):
    with pytest.raises(ValueError, match="too small for one step"):
        make(corpus, seq_len=4096, micro_batch_size=8)
    with pytest.raises(ValueError, match="rank 2 is not in"):
        make(corpus, rank=2, world_size=2)
    with pytest.raises(ValueError, match="vocab_size 1000, expected 4096"):
        make(corpus, vocab_size=4096)
    with pytest.raises(ValueError, match="bos_id unknown"):
        PackedLoader(corpus[0], seq_len=64, micro_batch_size=2)
