"""Gradients of the torch reference ops (custom backward, recomputed per chunk).

``torch.autograd.gradcheck`` (fast mode: random directional derivatives, which keeps the
number of op calls small) compares them with finite differences in float64 on tiny shapes, and they are compared with autograd through the float64 brute force (agreement to
1e-10: both are exact up to float64 rounding of sums of a few hundred terms).
"""

import pytest
import torch

import nsa
from tests.nsa import brute_force as bf

SHAPES = [  # B, T, H, Hkv, Dk, Dv, l, d, l', n, w, cu_seqlens
    (2, 13, 4, 2, 3, 2, 4, 2, 8, 2, 5, None),
    (1, 23, 2, 1, 2, 3, 4, 4, 4, 3, 3, [0, 2, 13, 23]),  # a document shorter than a block
]


def _inputs(shape):
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w, cu = shape
    cu = torch.tensor(cu, dtype=torch.int32) if cu else None
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, cu, torch.float64, seed=3)
    idx = bf.random_block_indices(B, T, Hkv, n, ls, cu, seed=4)
    return [x.requires_grad_(True) for x in (q, k, v, kc, vc)], idx, cu


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "varlen"])
@pytest.mark.usefixtures("chunk_sizes")
def test_gradcheck(shape):
    (q, k, v, kc, vc), idx, cu = _inputs(shape)
    _, _, _, _, _, _, l, d, ls, _, w, _ = shape

    def cmp(q, kc, vc):
        o, lse = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, cu_seqlens=cu, backend="torch")
        return o, torch.where(torch.isfinite(lse), lse, 0)  # lse is differentiable where finite

    assert torch.autograd.gradcheck(cmp, (q, kc, vc), fast_mode=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v: nsa.selected_attention(q, k, v, idx, select_len=ls, cu_seqlens=cu, backend="torch"),
        (q, k, v),
        fast_mode=True,
    )
    assert torch.autograd.gradcheck(
        lambda q, k, v: nsa.sliding_window_attention(q, k, v, window=w, cu_seqlens=cu, backend="torch"),
        (q, k, v),
        fast_mode=True,
    )


@pytest.mark.parametrize("shape", SHAPES, ids=["dense", "varlen"])
@pytest.mark.usefixtures("chunk_sizes")
def test_gradients_match_brute_force(shape):
    (q, k, v, kc, vc), idx, cu = _inputs(shape)
    _, _, _, _, Dk, _, l, d, ls, _, w, _ = shape
    g = torch.Generator().manual_seed(5)
    do = torch.randn(q.shape[:3] + (v.shape[-1],), generator=g, dtype=torch.float64)
    dlse = torch.randn(q.shape[:3], generator=g, dtype=torch.float64)

    def loss(o_cmp, lse, o_slc, o_win):
        lse = torch.where(torch.isfinite(lse), lse, 0)
        return (o_cmp * do).sum() + (lse * dlse).sum() + (o_slc * do).sum() + 0.5 * (o_win * do).sum()

    ours = loss(
        *nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, cu_seqlens=cu),
        nsa.selected_attention(q, k, v, idx, select_len=ls, cu_seqlens=cu),
        nsa.sliding_window_attention(q, k, v, window=w, cu_seqlens=cu),
    )
    ref = loss(
        *bf.compressed_attention(q, kc, vc, l, d, Dk**-0.5, cu),
        bf.selected_attention(q, k, v, idx, ls, Dk**-0.5, cu),
        bf.sliding_window_attention(q, k, v, w, Dk**-0.5, cu),
    )
    inputs = (q, k, v, kc, vc)
    for name, a, b in zip(
        "q k v k_cmp v_cmp".split(),
        torch.autograd.grad(ours, inputs),
        torch.autograd.grad(ref, inputs),
        strict=True,
    ):
        assert torch.isfinite(a).all(), name
        assert bf.relerr(a, b) < 1e-10, name


@pytest.mark.usefixtures("chunk_sizes")
def test_low_precision_gradients_close_to_float64():
    """bf16/f16 inputs: gradients come back in the input dtype, close to the float64 ones
    computed from the same rounded inputs (output rounding: 3e-2 for bf16, 4e-3 for f16)."""
    shape = (1, 40, 4, 2, 8, 8, 8, 4, 16, 3, 10, None)
    (q, k, v, kc, vc), idx, _ = _inputs(shape)
    for dtype, tol in ((torch.bfloat16, 3e-2), (torch.float16, 4e-3)):
        low = [x.detach().to(dtype).requires_grad_(True) for x in (q, k, v)]
        ref = [x.detach().to(dtype).double().requires_grad_(True) for x in (q, k, v)]
        grads = []
        for xs in (low, ref):
            o = nsa.selected_attention(*xs, idx, select_len=16) + nsa.sliding_window_attention(*xs, window=10)
            grads.append(torch.autograd.grad(o.float().square().sum() if xs is low else o.square().sum(), xs))
        for a, b in zip(*grads, strict=True):
            assert a.dtype == dtype and bf.relerr(a, b) < tol
