"""The fused CPU ops (backend "cpu", nsa/ops/attention_cpu.cpp) against the torch reference.

Both run in float32 on the same inputs; the reference is itself checked against the float64
brute force (test_reference_attention.py, test_reference_grad.py). Outputs and gradients are
compared by relative error ||a - b|| / ||b|| < 1e-5: both accumulate sums of at most a few
thousand float32 products in different orders (~1e-7 relative each), and the op's exp is a
polynomial within ~1 ulp of float32's. The compressed branch's block selection must be identical
(the inputs are random, so no two block scores tie to the last bit except forced or all-zero ones,
which both break to the lower index).
"""

from __future__ import annotations

import pytest
import torch

import nsa
from nsa.ops import attention_cpu, cpu_build
from nsa.ops.common import resolve_backend
from tests.nsa import brute_force as bf

BUILT = cpu_build.load() is not None
pytestmark = pytest.mark.skipif(not BUILT, reason="the fused CPU ops could not be built here (no C++ compiler?)")
TOL = 1e-5

# B, T, H, Hkv, Dk, Dv, l, d, l', n, w: T not a multiple of any block, G = H / Hkv in 1..16,
# Dk != Dv with and without whole vectors (16, 8 or 4 floats: nsa/ops/cpu_vec.h), windows and blocks longer than the op's
# 64-key tiles, more selected blocks than exist early on
CASES = [
    (1, 5, 2, 1, 8, 8, 16, 8, 32, 3, 4),  # shorter than one compression block
    (2, 67, 4, 2, 16, 8, 16, 8, 16, 4, 16),  # G = 2
    (3, 45, 6, 2, 24, 20, 8, 4, 16, 3, 7),  # G = 3, odd head dims
    (2, 130, 8, 1, 8, 16, 8, 4, 32, 5, 20),  # G = 8
    (1, 200, 16, 1, 72, 40, 32, 16, 64, 3, 150),  # G = 16, paper blocks, window over several tiles
    (2, 97, 2, 2, 8, 12, 8, 8, 8, 4, 9),  # G = 1, l = d = l'
    (1, 301, 8, 2, 64, 64, 32, 16, 64, 16, 100),  # paper head dims, n = 16
    (1, 260, 4, 1, 16, 16, 16, 8, 128, 3, 300),  # selection blocks of two tiles, window > T
    (1, 77, 4, 2, 18, 14, 16, 8, 32, 3, 20),  # head dims no multiple of 8 or 4
]
VARLEN = [(4, 2, 8, 8, 16, 8, 32, 3, 12, [0, 5, 40, 40, 41, 140]), (8, 1, 16, 8, 32, 16, 64, 4, 30, [0, 150, 170, 300])]


def _ids(cases):
    return [f"B{c[0]}T{c[1]}H{c[2]}Hkv{c[3]}Dk{c[4]}Dv{c[5]}" for c in cases]


def _branches(backend, q, k, v, kc, vc, blk, idx, cu):
    """The three branches' outputs (and the compressed lse, selected blocks) under one backend."""
    l, d, ls, n, w = blk
    o_c, lse, sel = nsa.compressed_attention_and_select(q, kc, vc, block_len=l, stride=d, select_len=ls,
                                                        num_select=n, cu_seqlens=cu, backend=backend)
    o_c2, lse2 = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, cu_seqlens=cu, backend=backend)
    o_s = nsa.selected_attention(q, k, v, idx, select_len=ls, cu_seqlens=cu, backend=backend)
    o_w = nsa.sliding_window_attention(q, k, v, window=w, cu_seqlens=cu, backend=backend)
    return dict(o_c=o_c, lse=lse, o_c2=o_c2, lse2=lse2, o_s=o_s, o_w=o_w), sel


def _compare(case, cu=None, seed=0):
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = case
    leaves = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, cu, torch.float32, seed=seed)
    idx = bf.random_block_indices(B, T, Hkv, n, ls, cu, seed=seed + 1)
    grads, outs, sels = {}, {}, {}
    g = torch.Generator().manual_seed(seed + 2)
    for backend in ("torch", "cpu"):
        xs = [x.detach().clone().requires_grad_(True) for x in leaves]
        out, sels[backend] = _branches(backend, *xs, (l, d, ls, n, w), idx, cu)
        g.manual_seed(seed + 2)
        loss = 0
        for o in out.values():  # a random linear function of every output (finite lse only)
            o = torch.where(torch.isfinite(o), o, 0)
            loss = loss + (o * torch.randn(o.shape, generator=g)).sum()
        loss.backward()
        outs[backend], grads[backend] = out, [x.grad for x in xs]
    for name, ref in outs["torch"].items():
        got = outs["cpu"][name]
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert torch.equal(torch.isinf(got), torch.isinf(ref)), name  # lse: -inf where nothing is visible
        fin = torch.isfinite(ref)
        assert bf.relerr(got[fin], ref[fin]) < TOL, (name, bf.relerr(got[fin], ref[fin]))
    assert torch.equal(sels["cpu"], sels["torch"])
    for name, got, ref in zip(("q", "k", "v", "k_cmp", "v_cmp"), grads["cpu"], grads["torch"], strict=True):
        assert bf.relerr(got, ref) < TOL, (name, bf.relerr(got, ref))


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_matches_reference(case):
    _compare(case)


@pytest.mark.parametrize("case", VARLEN, ids=["docs5", "docs3"])
def test_matches_reference_varlen(case):
    H, Hkv, Dk, Dv, l, d, ls, n, w, cu = case
    _compare((1, cu[-1], H, Hkv, Dk, Dv, l, d, ls, n, w), torch.tensor(cu, dtype=torch.int32))


@pytest.mark.parametrize("threads", [1, 3])
def test_thread_splits(threads):
    """With fewer (batch, KV head) pairs than threads each pair's queries are split into parts
    with their own dK / dV buffers (the compressed branch at equal work); with one thread, none."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _compare((1, 203, 4, 1, 16, 24, 16, 8, 32, 4, 40), seed=5)
        _compare((2, 150, 4, 2, 16, 16, 16, 8, 32, 4, 40), seed=6)
    finally:
        torch.set_num_threads(before)


def test_selected_ignores_invalid_repeated_and_future_blocks():
    """-1, repeated and non-causal block indices add nothing, as in the reference."""
    B, T, H, Hkv, D, ls = 1, 70, 4, 2, 16, 16
    q, k, v, _, _ = bf.make_inputs(B, T, H, Hkv, D, D, 16, 8, None, torch.float32, seed=3)
    idx = torch.full((B, T, Hkv, 5), -1, dtype=torch.int32)
    idx[..., 0] = 0
    idx[..., 1] = 0  # repeated
    idx[..., 2] = 4  # after every query's own block until t = 64
    idx[..., 3] = torch.arange(T, dtype=torch.int32)[None, :, None] // ls  # the query's own block
    o = nsa.selected_attention(q, k, v, idx, select_len=ls, backend="cpu")
    ref = nsa.selected_attention(q, k, v, idx, select_len=ls, backend="torch")
    assert bf.relerr(o, ref) < TOL


def test_backend_resolution(monkeypatch):
    """backend=None takes the fused ops for CPU float32 only, and not with NSA_CPU_KERNEL=0; an
    explicit "cpu" with another dtype runs the reference."""
    x32, x64 = torch.zeros(1, 2, 2, 8), torch.zeros(1, 2, 2, 8, dtype=torch.float64)
    assert resolve_backend(None, x32) == "cpu" and resolve_backend(None, x64) == "torch"
    assert resolve_backend(None, x32.bfloat16()) == "torch"
    monkeypatch.setenv(attention_cpu.ENV, "0")
    assert resolve_backend(None, x32) == "torch" and resolve_backend("cpu", x32) == "cpu"
    q, k, v, _, _ = bf.make_inputs(1, 20, 2, 1, 8, 8, 4, 2, None, torch.float64, seed=1)
    o = nsa.sliding_window_attention(q, k, v, window=5, backend="cpu")
    assert o.dtype == torch.float64
    assert bf.relerr(o, bf.sliding_window_attention(q, k, v, 5, 8**-0.5)) < 1e-12


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
def test_forward_without_kt_transposes_the_same_tiles(case):
    """Given no kT, a forward transposes the K tiles it reads itself (TileCache in attention_cpu.cpp:
    W x W register transposes, a scalar tail for Dk no multiple of W, zeros past S): every branch's
    output, lse and selection are bit-identical to the run on the precomputed tiles."""
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = case
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, None, torch.float32, seed=3)
    idx = bf.random_block_indices(B, T, Hkv, n, ls, None, seed=4).to(torch.int32).contiguous()
    op, none = cpu_build.require(), torch.empty(0)
    scale = Dk**-0.5
    runs = [  # mode, keys, values, block indices, (window, select_len, block_len, stride), (n, init, local)
        (attention_cpu.WINDOW, k, v, none, (w, 0, 0, 0), (0, 0, 0)),
        (attention_cpu.SELECTED, k, v, idx, (0, ls, 0, 0), (0, 0, 0)),
        (attention_cpu.COMPRESSED, kc, vc, none, (0, ls, l, d), (n, 1, 2)),
    ]
    for mode, kk, vv, ix, params, select in runs:
        got = op.attention_forward(q, kk, none, vv, ix, mode, *params, scale, *select)
        ref = op.attention_forward(q, kk, attention_cpu._tiled_t(kk), vv, ix, mode, *params, scale, *select)
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b), mode


# B, T, H, Hkv, Dk, Dv, l, d, l', n, w: the selected tiles in o over several phases (G = 8, 16, with Dv < Dk
# and Dv > Dk, the paper's blocks and others: T / G rows hold them); G = 1: a tensor of their own; 199
# compressed keys (4 tiles, more than the ring's 3 slots)
IN_OUTPUT = [
    (2, 1500, 16, 2, 64, 64, 32, 16, 64, 16, 512),
    (1, 900, 16, 1, 24, 40, 16, 8, 32, 5, 100),
    (2, 611, 8, 1, 40, 24, 16, 16, 16, 6, 50),
    (1, 400, 2, 2, 16, 16, 4, 2, 16, 4, 30),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("case", IN_OUTPUT, ids=_ids(IN_OUTPUT))
def test_forward_keeps_selected_tiles_in_its_output(case, threads):
    """Given no kT for the selected branch, a forward transposes its K into the rows of o that no
    query has written yet and runs the queries from the last to the first in phases
    (attention_cpu.cpp, ForwardPlan), and the compressed branch's tiles per query group: the fused
    and the one-branch forward are bit-identical to the runs on separately precomputed tiles, with
    every thread count; a phase that overwrote tiles a later query reads would change o."""
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = case
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, None, torch.float32, seed=5)
    gates = torch.rand(B, T, H, 3, generator=torch.Generator().manual_seed(6))
    op, none, tiled = cpu_build.require(), torch.empty(0), attention_cpu._tiled_t
    scale, before = Dk**-0.5, torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        fused = [
            op.nsa_forward(q, [kc, k, k], kts, [vc, v, v], [True, True, True], gates, w, ls, l, d, scale, n, 1, 2, True)
            for kts in ([none, none, none], [tiled(kc), tiled(k), none])
        ]
        idx = fused[1][1]
        one = [op.attention_forward(q, k, kt, v, idx, attention_cpu.SELECTED, 0, ls, 0, 0, scale, 0, 0, 0)
               for kt in (none, tiled(k))]
    finally:
        torch.set_num_threads(before)
    for got, ref in (fused, one):
        for a, b in zip(got, ref, strict=True):
            assert torch.equal(a, b)


def test_shared_kv_is_laid_out_once():
    """A K/V pair the selected and window branches share (the layer's one K/V for all branches, a
    strided view of its projection) is copied contiguous once, whether or not a branch's forward
    is handed K^T (a short window's is not: the op transposes its tiles itself)."""
    kv = torch.randn(1, 300, 2, 2, 16)
    k, v = kv[..., 0, :], kv[..., 1, :]  # [B, T, Hkv, D] views, not contiguous
    k_cmp, v_cmp = torch.randn(1, 10, 2, 16), torch.randn(1, 10, 2, 16)
    pairs, run = ((k_cmp, v_cmp), (k, v), (k, v)), (True, True, True)
    kc, kt, vc, vt = attention_cpu._branch_layouts(pairs, run, True, (True, True, False))
    assert kc[1] is kc[2] and vc[1] is vc[2] and vt[1] is vt[2] and kc[1].is_contiguous()
    assert torch.equal(kt[1], attention_cpu._tiled_t(k)) and kt[2].numel() == 0


def test_only_inputs_are_saved():
    """The backward needs neither the output nor a copy of it, nor lse (it recomputes each row's
    softmax): the graph holds q, k, v (the inputs themselves) and, selected, the block indices."""
    q, k, v, _, _ = bf.make_inputs(1, 40, 4, 2, 16, 16, 8, 4, None, torch.float32, seed=2)
    q, k, v = (x.requires_grad_(True) for x in (q, k, v))
    o = nsa.sliding_window_attention(q, k, v, window=8, backend="cpu")
    saved = o.grad_fn.saved_tensors
    assert saved[0] is q or saved[0].data_ptr() == q.data_ptr()
    assert sum(t.numel() for t in saved if t is not None) == q.numel() + k.numel() + v.numel()


def test_fused_op_saves_only_its_inputs_and_can_drop_the_selection():
    """native_sparse_attention keeps its inputs only (no lse per branch, no selection: its backward
    selects again); without return_selection it returns no selection, the same output and
    gradients."""
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = 1, 150, 4, 2, 16, 16, 16, 8, 32, 3, 24
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, None, torch.float32, seed=7)
    gates = torch.rand(B, T, H, 3, generator=torch.Generator().manual_seed(8))
    dout = torch.randn(B, T, H, Dv, generator=torch.Generator().manual_seed(9))
    runs = []
    for keep in (True, False):
        xs = [x.detach().clone().requires_grad_(True) for x in (q, kc, vc, k, v, gates)]
        o, idx = nsa.native_sparse_attention(*xs[:5], xs[3], xs[4], xs[5], block_len=l, stride=d, select_len=ls,
                                             num_select=n, window=w, backend="cpu", return_selection=keep)
        saved = o.grad_fn.saved_tensors
        assert sum(t.numel() for t in saved if t is not None) == sum(x.numel() for x in xs) + k.numel() + v.numel()
        (o * dout).sum().backward()
        runs.append((o, idx, [x.grad for x in xs]))
    (o1, idx1, g1), (o2, idx2, g2) = runs
    assert idx1 is not None and idx1.shape == (B, T, Hkv, n) and idx2 is None
    assert torch.equal(o1, o2)
    for a, b in zip(g1, g2, strict=True):
        assert torch.equal(a, b)


def _nsa_compare(case, branches=("cmp", "slc", "win"), gated=True, share=False, cu=None, seed=0):
    """native_sparse_attention: the fused op (backend "cpu") against the composition of the torch
    reference ops, outputs, selected blocks and the gradients of every input, gates included."""
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = case
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, cu, torch.float32, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    k2, v2 = (k, v) if share else (torch.randn(k.shape, generator=g), torch.randn(v.shape, generator=g))
    gates = torch.rand(B, T, H, 3, generator=g) if gated else None
    leaves = [x for x in (q, kc, vc, k, v, k2, v2, gates)]
    dout = torch.randn(B, T, H, Dv, generator=g)
    res = {}
    for backend in ("torch", "cpu"):
        xs = [None if x is None else x.detach().clone().requires_grad_(True) for x in leaves]
        if share:
            xs[5], xs[6] = xs[3], xs[4]
        o, idx = nsa.native_sparse_attention(*xs, block_len=l, stride=d, select_len=ls, num_select=n, window=w,
                                             branches=branches, cu_seqlens=cu, backend=backend)
        (o * dout).sum().backward()
        grads = [None if x is None else x.grad for x in xs[:5] + ([] if share else xs[5:7]) + xs[7:]]
        res[backend] = (o, idx, grads)
    (o_ref, idx_ref, g_ref), (o, idx, g_cpu) = res["torch"], res["cpu"]
    assert o.shape == o_ref.shape and bf.relerr(o, o_ref) < TOL
    assert (idx is None) == (idx_ref is None) and (idx is None or torch.equal(idx, idx_ref))
    for i, (a, b) in enumerate(zip(g_cpu, g_ref, strict=True)):
        assert (a is None) == (b is None) or (b is not None and b.abs().max() == 0), i
        if a is not None and b is not None:
            assert bf.relerr(a, b) < TOL, (i, bf.relerr(a, b))


@pytest.mark.parametrize("case", CASES[1:5] + CASES[6:], ids=_ids(CASES[1:5] + CASES[6:]))
def test_native_sparse_attention_matches_composition(case):
    _nsa_compare(case)


@pytest.mark.parametrize("branches", [("win",), ("slc", "win"), ("cmp",), ("cmp", "win"), ("slc",)])
def test_native_sparse_attention_branch_subsets(branches):
    _nsa_compare(CASES[3], branches=branches, seed=3)


def test_native_sparse_attention_shared_kv_no_gates_varlen():
    H, Hkv, Dk, Dv, l, d, ls, n, w, cu = VARLEN[0]
    case = (1, cu[-1], H, Hkv, Dk, Dv, l, d, ls, n, w)
    _nsa_compare(case, gated=False, share=True, cu=torch.tensor(cu, dtype=torch.int32), seed=4)
    _nsa_compare(CASES[6], share=True, seed=5)


@pytest.mark.parametrize("threads", [1, 3])
def test_native_sparse_attention_thread_splits(threads):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _nsa_compare((1, 203, 4, 1, 16, 24, 16, 8, 32, 4, 40), seed=6)
    finally:
        torch.set_num_threads(before)


def test_strided_kv_views():
    """K and V as views of one fused [B, T, Hkv, Dk + Dv] projection (not contiguous): the op reads K
    and V rows in their [B, T, Hkv, D] layout (a head's rows Hkv D apart), so outputs and gradients
    match the reference whatever the caller's strides."""
    B, T, H, Hkv, Dk, Dv, ls, n = 2, 150, 8, 2, 16, 24, 16, 4
    g = torch.Generator().manual_seed(7)
    q, kv = torch.randn(B, T, H, Dk, generator=g), torch.randn(B, T, Hkv, Dk + Dv, generator=g)
    idx = bf.random_block_indices(B, T, Hkv, n, ls, None, seed=8)
    res = {}
    for backend in ("torch", "cpu"):
        qq, kvv = q.clone().requires_grad_(True), kv.clone().requires_grad_(True)
        k, v = kvv[..., :Dk], kvv[..., Dk:]
        o_w = nsa.sliding_window_attention(qq, k, v, window=40, backend=backend)
        o_s = nsa.selected_attention(qq, k, v, idx, select_len=ls, backend=backend)
        (o_w.square().sum() + (o_s * o_w).sum()).backward()
        res[backend] = (o_w, o_s, qq.grad, kvv.grad)
    for a, b in zip(res["cpu"], res["torch"], strict=True):
        assert bf.relerr(a, b) < TOL
