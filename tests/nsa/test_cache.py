"""NSACache: incremental decoding equals the full forward; cache contents; K/V read counts (Table 4).

Decode vs forward tolerance: the decode path (nsa.cache, dense torch) and the
full path (functional ops) compute the same float32 softmax sums in a
different order, so they agree to ~1e-7 relative; the test allows 1e-5 per
token. Any selection or visibility error (a wrong block chosen, a compressed
entry shown a step early, a window slot off by one) moves that token's output
by >1e-2 relative, so a per-token check cannot miss it.
"""

from __future__ import annotations

import pytest
import torch

from nsa.cache import NSACache, kv_tokens_read
from nsa.rope import rotary_tables

try:  # tests/nsa is a package when it has an __init__.py, a plain rootdir otherwise
    from .test_layer import SMALL, make_layer, relerr, tables
except ImportError:
    from test_layer import SMALL, make_layer, relerr, tables

TOL = 1e-5


def decode_all(layer, x, prefill: int, step_sizes=(1,)):
    """Prefill ``prefill`` tokens, then decode the rest in steps cycling through ``step_sizes``."""
    B, T, _ = x.shape
    Dk = layer.cfg.head_dim_k
    cos, sin = (t.to(x.device) for t in tables(B, T, Dk))
    cache = layer.new_cache(B, T, x.device, torch.float32)
    outs = [layer(x[:, :prefill], cos[:, :prefill], sin[:, :prefill], cache=cache)]
    t, i = prefill, 0
    while t < T:
        m = min(step_sizes[i % len(step_sizes)], T - t)
        outs.append(layer(x[:, t:t + m], cos[:, t:t + m], sin[:, t:t + m], cache=cache))
        t, i = t + m, i + 1
    assert cache.length == T
    return torch.cat(outs, 1), cache


def per_token_relerr(a, b):
    return ((a - b).norm(dim=-1) / b.norm(dim=-1)).max().item()


@pytest.mark.parametrize(
    "variant, prefill, steps",
    [
        ({}, 1, (1,)),  # everything decoded token by token from the first token
        ({}, 21, (1, 3, 2)),  # prefill ends inside a compression block; multi-token steps
        ({"share_kv": True}, 40, (1,)),
        ({"compress": "mean"}, 33, (1, 4)),
        ({"cmp_rope": "block"}, 21, (1, 3, 2)),  # compressed keys rotated after phi, as their blocks' last tokens
        ({"cmp_rope": "block", "share_kv": True}, 1, (1,)),
        ({"num_kv_heads": 4, "num_local": 2, "num_init": 0}, 17, (1,)),  # no GQA sharing, no forced init block
    ],
)
def test_decode_equals_full_forward(variant, prefill, steps):
    layer = make_layer(3, **variant)
    cfg = layer.cfg
    B, T = 2, 104  # 7 selection blocks > n=3, 6.5 windows, 25 compressed blocks
    assert T // cfg.select_len > cfg.num_select and T > 4 * cfg.window
    x = torch.randn(B, T, cfg.hidden_size)
    with torch.no_grad():
        y = layer(x, *tables(B, T, cfg.head_dim_k))
        yd, cache = decode_all(layer, x, prefill, steps)
    assert per_token_relerr(yd, y) < TOL
    assert relerr(yd, y) < TOL


@pytest.mark.parametrize("cmp_rope", ["tokens", "block"])
def test_cache_contents_match_the_full_forward(cmp_rope):
    layer = make_layer(4, cmp_rope=cmp_rope)
    cfg = layer.cfg
    B, T, l, d, w = 2, 75, cfg.block_len, cfg.stride, cfg.window
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = tables(B, T, cfg.head_dim_k)
    with torch.no_grad():
        kv = layer._branch_kv(x, cos, sin)
        k_cmp, v_cmp = layer._compressed_kv(*kv["cmp"], None, (cos, sin))
        _, cache = decode_all(layer, x, 30, (1, 2))
    n = (T - l) // d + 1
    assert cache.num_cmp == n == k_cmp.shape[1]
    assert relerr(cache.k_cmp[:, :n], k_cmp) < TOL and relerr(cache.v_cmp[:, :n], v_cmp) < TOL
    assert relerr(cache.k_slc[:, :T], kv["slc"][0]) < 1e-6
    k_ring, v_ring, pos = cache.window_state()
    assert sorted(pos.tolist()) == list(range(T - w, T))
    assert relerr(k_ring, kv["win"][0][:, pos]) < 1e-6 and relerr(v_ring, kv["win"][1][:, pos]) < 1e-6
    # the incomplete compression block: the last l - 1 raw compressed-branch tokens
    assert relerr(cache.k_tail, kv["cmp"][0][:, T - l + 1:]) < 1e-6


def test_cache_count_matches_kv_tokens_read():
    """The cache holds exactly the compressed entries the count says a step reads."""
    layer = make_layer(5)
    cfg = layer.cfg
    cache = layer.new_cache(1, 64, None, torch.float32)
    x = torch.randn(1, 64, cfg.hidden_size)
    cos, sin = tables(1, 64, cfg.head_dim_k)
    counts = dict(block_len=cfg.block_len, stride=cfg.stride, select_len=cfg.select_len,
                  num_select=cfg.num_select, window=cfg.window)
    with torch.no_grad():
        for t in range(64):
            layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache)
            assert cache.num_cmp == kv_tokens_read(t + 1, **counts)["compressed"]


PAPER = dict(block_len=32, stride=16, select_len=64, num_select=16, window=512)


@pytest.mark.parametrize("s, table4", [(8192, 2048), (16384, 2560), (32768, 3584), (65536, 5632)])
def test_kv_tokens_read_against_paper_table4(s, table4):
    c = kv_tokens_read(s, **PAPER)
    assert c["compressed"] == (s - 32) // 16 + 1 == s // 16 - 1
    assert c["selected"] == 16 * 64 and c["window"] == 512
    assert c["total"] == c["compressed"] + c["selected"] + c["window"]
    # the paper rounds the compressed count to s/d; the exact count is one lower
    assert c["total"] + 1 == table4
    assert c["total"] - c["compressed"] + s // 16 == table4


def test_kv_tokens_read_short_context_and_errors():
    c = kv_tokens_read(20, **PAPER)
    assert c == {"compressed": 0, "selected": 20, "window": 20, "total": 40}
    assert kv_tokens_read(32, **PAPER)["compressed"] == 1
    assert kv_tokens_read(47, **PAPER)["compressed"] == 1 and kv_tokens_read(48, **PAPER)["compressed"] == 2
    with pytest.raises(ValueError, match="stride"):
        kv_tokens_read(100, **{**PAPER, "stride": 0})


def test_cache_misuse_raises():
    layer = make_layer()
    cfg = layer.cfg
    cache = layer.new_cache(2, 16, None, torch.float32)
    assert isinstance(cache, NSACache)
    x = torch.randn(2, 10, cfg.hidden_size)
    cos, sin = tables(2, 10, cfg.head_dim_k)
    with pytest.raises(ValueError, match="rows"):
        layer(x[:1], cos[:1], sin[:1], cache=cache)
    with pytest.raises(ValueError, match="cu_seqlens"):
        layer(x[:1], cos[:1], sin[:1], cache=layer.new_cache(1, 16), cu_seqlens=torch.tensor([0, 10], dtype=torch.int32))
    layer(x, cos, sin, cache=cache)
    pos = torch.arange(10, 20)[None].expand(2, 10)
    with pytest.raises(ValueError, match="max_len"):
        layer(x, *rotary_tables(pos, cfg.head_dim_k), cache=cache)


def test_batched_rows_decode_independently():
    """Row b of a batched decode equals decoding row b alone."""
    layer = make_layer(6)
    x = torch.randn(3, 40, SMALL["hidden_size"])
    with torch.no_grad():
        yb, _ = decode_all(layer, x, 19)
        y1, _ = decode_all(layer, x[1:2], 19)
    assert relerr(yb[1:2], y1) < TOL


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_decode_equals_forward_on_cuda_paper_settings():
    """Paper NSA settings (l=32, d=16, l'=64, n=16, w=512) on a GPU: prefill by the
    Triton kernels, then 300 dense decode steps past the window; float32, 1e-4 per
    token (IEEE dots in both paths, summation order differs over ~1.5k keys)."""
    torch.manual_seed(0)
    layer = make_layer(8, hidden_size=128, num_heads=8, num_kv_heads=2, head_dim_k=64, head_dim_v=32,
                       block_len=32, stride=16, select_len=64, num_select=16, num_init=1, num_local=2,
                       window=512).cuda()
    B, T, prefill = 2, 1400, 1100
    x = torch.randn(B, T, 128, device="cuda")
    with torch.no_grad():
        y = layer(x, *(t.cuda() for t in tables(B, T, 64)))
        yd, cache = decode_all(layer, x, prefill, (1, 1, 3))
    assert cache.num_cmp == kv_tokens_read(T, block_len=32, stride=16, select_len=64, num_select=16,
                                           window=512)["compressed"]
    assert per_token_relerr(yd[:, prefill:], y[:, prefill:]) < 1e-4


def test_decode_steps_read_only_the_cache(monkeypatch):
    """After prefill, a step never runs the full-sequence ops: it works from the cached state."""
    import nsa

    layer = make_layer(10)
    cfg = layer.cfg
    x = torch.randn(1, 60, cfg.hidden_size)
    cos, sin = tables(1, 60, cfg.head_dim_k)
    cache = layer.new_cache(1, 60)
    with torch.no_grad():
        layer(x[:, :40], cos[:, :40], sin[:, :40], cache=cache)

        def forbidden(*args, **kwargs):
            raise AssertionError("a decode step called a full-sequence op")

        for op in ("compressed_attention", "select_blocks", "selected_attention", "sliding_window_attention"):
            monkeypatch.setattr(nsa, op, forbidden)
        for t in range(40, 60):
            layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache)
    assert cache.length == 60
