"""KV-cached decoding reproduces a full forward pass; generate() behaviour.

Tolerance: float32 on CPU. Decode and full forward compute the same softmax sums
in a different order (and NSA's decode path is a dense torch path, its forward the
chunked ops), so logits agree to ~1e-6 relative; 1e-5 per position leaves margin.
A wrong visibility (a compressed block shown early, a window slot off by one, a
wrong selected block) moves a position's logits by >1e-3, which the per-position
check cannot miss.
"""

import pytest
import torch

from train.model import build_model
from train.model.generate import generate, sample_next

from .helpers import KINDS, attn_cfg, model_cfg

TOL = 1e-5


def _decode_logits(model, ids, prefill, steps=(1,)):
    B, T = ids.shape
    cache = model.new_cache(B, T)
    outs = [model(ids[:, :prefill], cache=cache).logits]
    t, i = prefill, 0
    while t < T:
        m = min(steps[i % len(steps)], T - t)
        outs.append(model(ids[:, t:t + m], cache=cache).logits)
        t, i = t + m, i + 1
    assert cache.seq_len == T
    return torch.cat(outs, 1)


@pytest.mark.parametrize("kind, mlp, prefill, steps", [
    ("full", "swiglu", 1, (1,)), ("full", "moe", 21, (1, 3, 2)),
    ("nsa", "swiglu", 1, (1,)), ("nsa", "moe", 21, (1, 3, 2))])
def test_decode_equals_forward(kind, mlp, prefill, steps):
    """80 tokens: 10 compression blocks (l=8,d=4) and 5 selection blocks (l'=16) are
    crossed, and the window (w=16) is passed several times, with one-token and
    multi-token steps after a prefill that ends inside a block."""
    torch.manual_seed(0)
    model = build_model(model_cfg(mlp), attn_cfg(kind)).eval()
    ids = torch.randint(0, 97, (2, 80))
    with torch.no_grad():
        full = model(ids).logits
        dec = _decode_logits(model, ids, prefill, steps)
    err = ((dec - full).norm(dim=-1) / full.norm(dim=-1)).max().item()
    assert err < TOL


def test_cache_overflow_and_varlen_with_cache_raise():
    model = build_model(model_cfg(), attn_cfg("full"))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="overflow"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        model(torch.zeros(1, 4, dtype=torch.long), cu_seqlens=torch.tensor([0, 4], dtype=torch.int32),
              cache=model.new_cache(1, 4))


def _greedy_reference(model, prompt, n):
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


@pytest.mark.parametrize("kind", KINDS)
def test_generate_greedy_matches_uncached_argmax(kind):
    """Rows of different lengths (grouped into batches by length) give exactly the
    tokens of repeated full forward passes over each row alone."""
    torch.manual_seed(0)
    model = build_model(model_cfg(), attn_cfg(kind)).eval()
    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13]]  # up to 17 tokens: past the window w=16
    got = generate(model, prompts, max_new_tokens=12, batch_size=2)
    assert got == [_greedy_reference(model, p, 12) for p in prompts]


def test_generate_stop_ids_and_tensor_prompts():
    torch.manual_seed(0)
    model = build_model(model_cfg(), attn_cfg("full")).eval()
    prompts = torch.tensor([[1, 2, 3], [4, 5, 6]])
    free = generate(model, prompts, max_new_tokens=8)
    stop = free[0][3]
    stopped = generate(model, prompts, max_new_tokens=8, stop_ids=[stop])
    assert stopped[0] == free[0][:free[0].index(stop)]
    row1 = free[1][:free[1].index(stop)] if stop in free[1] else free[1]
    assert stopped[1] == row1


def test_sampling_filters():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]]).repeat(200, 1)
    g = torch.Generator().manual_seed(0)
    assert sample_next(logits, temperature=1.0, top_k=1, generator=g).eq(1).all()
    top2 = sample_next(logits, temperature=1.0, top_k=2, generator=g)
    assert set(top2.tolist()) == {1, 3}
    # softmax([3, 2, 1, 0]) = [.64, .24, .09, .03]: top_p=0.8 keeps tokens 1 and 3 only
    nucleus = sample_next(logits, temperature=1.0, top_p=0.8, generator=g)
    assert set(nucleus.tolist()) == {1, 3}
    assert sample_next(logits, temperature=0.0).eq(1).all()
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, temperature=1.0, top_p=0.0)


def test_generate_bad_input():
    model = build_model(model_cfg(), attn_cfg("full"))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [[1]], max_new_tokens=0)
