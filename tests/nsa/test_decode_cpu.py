"""nsa.ops.decode_cpu: the fused one-token CPU decode step against the torch path (nsa.cache.decode_token).

Same branch outputs to float32 rounding (1e-5 relative: the kernel sums in another order and uses its
own exp) and the same selected blocks, step by step from the first token: before the first complete
compressed block (all scores 0: ties), before the ring is full, contexts that are no multiple of any
block, G = 1, 3, 8, Dk != Dv, head dims that are and are not multiples of the kernel's vector width
(16 lanes with AVX-512, 8 with AVX2, 4 otherwise: nsa/ops/cpu_vec.h).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from nsa.cache import decode_compressed, decode_select, decode_token
from nsa.ops import cpu_build, decode_cpu
from nsa.rope import apply_rotary

try:
    from .test_layer import SMALL, make_layer, relerr, tables
except ImportError:
    from test_layer import SMALL, make_layer, relerr, tables

TOL = 1e-5

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    BUILT = decode_cpu.load() is not None
needs_kernel = pytest.mark.skipif(not BUILT, reason="the fused CPU decode kernel could not be built here "
                                                    "(no C++ compiler or ninja?); the torch path is used instead")


def _steps(layer, B, T):
    """Yield, for t = 1 .. T-1, the newest token's q [B,Hkv,G,Dk] and the cache holding it (torch path appends)."""
    cfg = layer.cfg
    H, Hkv = cfg.num_heads, cfg.num_kv_heads
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = tables(B, T, cfg.head_dim_k)
    cache = layer.new_cache(B, T)
    layer(x[:, :1], cos[:, :1], sin[:, :1], cache=cache)
    for t in range(1, T):
        xt, ct, st = x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1]
        q = apply_rotary(layer.q_proj(xt).view(B, 1, H, -1), ct, st)
        cache.append(layer._branch_kv(xt, ct, st), layer.compress)
        yield t, q.view(B, Hkv, H // Hkv, -1), cache


# (layer overrides, branches) of the step-by-step comparison (also run against other builds of the op:
# tests/nsa/test_cpu_isa.py)
KERNEL_CASES = [
    ({}, ("cmp", "slc", "win")),  # G=2, Dk=16, Dv=8 (SMALL)
    (dict(num_heads=3, num_kv_heads=3, head_dim_k=32, head_dim_v=48), ("cmp", "slc", "win")),  # G=1
    (dict(num_heads=6, num_kv_heads=2, head_dim_k=24, head_dim_v=40, num_select=4, num_local=2),
     ("cmp", "slc", "win")),  # G=3, dims no multiple of 16
    (dict(num_heads=4, num_kv_heads=2, head_dim_k=20, head_dim_v=14), ("cmp", "slc", "win")),  # no multiple of 8 or 4
    (dict(num_heads=16, num_kv_heads=2, head_dim_k=64, head_dim_v=32, block_len=16, stride=8, select_len=32,
          num_select=4, num_local=2, window=40), ("cmp", "slc", "win")),  # G=8
    (dict(num_init=0), ("slc",)),
    ({}, ("win",)),
    ({}, ("cmp", "win")),
]


@needs_kernel
@pytest.mark.parametrize("overrides, branches", KERNEL_CASES)
def test_kernel_matches_torch_path_step_by_step(overrides, branches):
    layer = make_layer(11, **overrides)
    cfg = layer.cfg
    B, T = 2, 5 * cfg.select_len + 7  # past the window, n < selection blocks, no multiple of l, d, l', w
    sel = dict(num_select=cfg.num_select, num_init=cfg.num_init, num_local=cfg.num_local)
    with torch.no_grad():
        for t, q, cache in _steps(layer, B, T):
            ref = decode_token(q, cache, layer.scale, branches=branches, **sel)
            got, idx = decode_cpu.decode_token(q, cache, layer.scale, branches=branches, **sel)
            assert set(got) == set(branches)
            for b in branches:
                assert relerr(got[b], ref[b]) < TOL, (t, b)
            if "slc" in branches:  # the blocks of the multi-token path's selection (ascending, -1 padding last)
                pos = torch.tensor([t])
                _, p = decode_compressed(q[:, None], cache, pos, layer.scale)
                want = decode_select(p, cache, pos, **sel)[:, 0]
                assert torch.equal(idx, want[..., :idx.shape[-1]]), t
                assert (want[..., idx.shape[-1]:] == -1).all()


@needs_kernel
@pytest.mark.parametrize("variant", [{}, {"share_kv": True}, {"branches": ("slc", "win")}, {"cmp_rope": "block"},
                                     {"cmp_rope": "block", "share_kv": True}])
def test_layer_decode_with_and_without_kernel(monkeypatch, variant):
    """Token-by-token decode through the layer: kernel on and off give the same outputs and caches."""
    layer = make_layer(12, **variant)
    cfg = layer.cfg
    B, T = 2, 70
    x = torch.randn(B, T, cfg.hidden_size)
    cos, sin = tables(B, T, cfg.head_dim_k)
    calls = []
    attend = decode_cpu.attend
    monkeypatch.setattr(decode_cpu, "attend", lambda *a, **k: calls.append(1) or attend(*a, **k))
    runs = {}
    with torch.no_grad():
        for flag in ("1", "0"):
            monkeypatch.setenv(decode_cpu.ENV, flag)
            cache = layer.new_cache(B, T)
            ys = [layer(x[:, :5], cos[:, :5], sin[:, :5], cache=cache)]
            ys += [layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache) for t in range(5, T)]
            runs[flag] = torch.cat(ys, 1), cache, layer.last_gate_means
    assert len(calls) == T - 5  # every one-token step of the first run, none of the second
    (y1, c1, g1), (y0, c0, g0) = runs["1"], runs["0"]
    assert relerr(y1, y0) < TOL
    assert ((y1 - y0).norm(dim=-1) / y0.norm(dim=-1)).max() < TOL
    for name in ("_k_slc", "_v_slc", "_k_win", "_v_win", "_k_cmp", "_v_cmp"):
        torch.testing.assert_close(getattr(c1, name), getattr(c0, name), rtol=1e-6, atol=1e-6)
    assert (c1.length, c1.num_cmp) == (c0.length, c0.num_cmp)
    assert relerr(c1.k_tail, c0.k_tail) < 1e-6 and relerr(c1.v_tail, c0.v_tail) < 1e-6
    assert g1.keys() == g0.keys() and all(torch.allclose(g1[k], g0[k]) for k in g0)


def test_kernel_is_used_only_where_it_applies(monkeypatch):
    layer = make_layer(13)
    cache = layer.new_cache(1, 8)
    x = torch.randn(1, 1, SMALL["hidden_size"])
    with torch.no_grad():
        assert decode_cpu.usable(x, cache) == BUILT
        monkeypatch.setenv(decode_cpu.ENV, "0")
        assert not decode_cpu.usable(x, cache)
        monkeypatch.delenv(decode_cpu.ENV)
        assert not decode_cpu.usable(x.double(), cache)
    assert not decode_cpu.usable(x, cache)  # autograd on: the torch path keeps the graph
    assert decode_cpu.applies("cpu", torch.float32) == BUILT
    assert not decode_cpu.applies("cpu", torch.bfloat16) and not decode_cpu.applies("meta", torch.float32)


def test_build_failure_warns_once_and_falls_back(monkeypatch):
    def broken():
        raise RuntimeError("no compiler\nmore lines")

    monkeypatch.setattr(cpu_build, "_build", broken)
    monkeypatch.setattr(cpu_build, "_module", None)
    monkeypatch.setattr(cpu_build, "_tried", False)
    layer = make_layer(14)
    B, T = 1, 24
    x = torch.randn(B, T, SMALL["hidden_size"])
    cos, sin = tables(B, T, SMALL["head_dim_k"])
    with torch.no_grad(), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cache = layer.new_cache(B, T)
        ys = [layer(x[:, :1], cos[:, :1], sin[:, :1], cache=cache)]
        ys += [layer(x[:, t:t + 1], cos[:, t:t + 1], sin[:, t:t + 1], cache=cache) for t in range(1, T)]
        y = layer(x, cos, sin)
    msgs = [str(w.message) for w in caught if "fused CPU kernels" in str(w.message)]
    assert len(msgs) == 1 and "no compiler" in msgs[0] and "more lines" not in msgs[0]
    assert relerr(torch.cat(ys, 1), y) < TOL
