"""Torch reference attention ops against the float64 brute force (tests/nsa/brute_force.py).

Tolerances are relative errors ||a - b|| / ||b||, chosen from the input dtype's rounding:
inputs are rounded to the dtype first and the brute force sees the same rounded values, so
what is left is accumulation error (float32, ~1e-7 per op, summed over <= a few hundred
terms: 2e-6) and the final rounding of the output (float16 eps 4.9e-4 -> 2e-3, bfloat16
eps 3.9e-3 -> 1.5e-2). float64 agrees to 1e-12.
"""

import pytest
import torch

import nsa
from tests.nsa import brute_force as bf

TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}

# B, T, H, Hkv, Dk, Dv, l, d, l', n, w: T not a multiple of any block size, shorter than a
# block, G = H / Hkv in {1, 2, 4, 8, 16}, Dk != Dv, small and paper-like block settings.
CASES = [
    (1, 5, 2, 1, 8, 8, 16, 8, 32, 3, 4),  # shorter than one compression block
    (2, 67, 4, 2, 16, 8, 16, 8, 16, 4, 16),  # G = 2, l = l'
    (3, 45, 4, 1, 8, 12, 8, 4, 16, 3, 7),  # G = 4, B = 3
    (2, 130, 8, 1, 8, 16, 8, 4, 32, 5, 20),  # G = 8
    (1, 200, 16, 1, 8, 8, 32, 16, 64, 3, 50),  # G = 16, paper l, d, l'
    (2, 97, 2, 2, 8, 12, 8, 8, 8, 4, 9),  # G = 1, l = d = l'
]
VARLEN = [  # cu_seqlens with documents shorter than a block and an empty one
    (4, 2, 8, 8, 16, 8, 32, 3, 12, [0, 5, 40, 40, 41, 140]),
    (8, 1, 16, 8, 32, 16, 64, 4, 30, [0, 150, 170, 300]),
]


def _ids(cases):
    return [f"B{c[0]}T{c[1]}H{c[2]}Hkv{c[3]}" for c in cases]


def _check(out, ref, dtype):
    assert out.dtype == dtype and out.shape == ref.shape
    assert torch.isfinite(out).all()
    err = bf.relerr(out, ref)
    assert err < TOL[dtype], err


def _run_all(case, dtype, cu=None):
    """Reference and brute force for the three attention branches on one random input."""
    B, T, H, Hkv, Dk, Dv, l, d, ls, n, w = case
    q, k, v, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dv, l, d, cu, dtype)
    idx = bf.random_block_indices(B, T, Hkv, n, ls, cu)
    scale = Dk**-0.5
    o, lse = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, cu_seqlens=cu, backend="torch")
    o_ref, lse_ref = bf.compressed_attention(q, kc, vc, l, d, scale, cu)
    _check(o, o_ref, dtype)
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert torch.equal(torch.isinf(lse), torch.isinf(lse_ref)) and (lse[torch.isinf(lse)] < 0).all()
    fin = torch.isfinite(lse_ref)
    assert bf.relerr(lse[fin], lse_ref[fin]) < max(TOL[dtype], 1e-6)
    assert (o[torch.isinf(lse)] == 0).all()
    o = nsa.selected_attention(q, k, v, idx, select_len=ls, cu_seqlens=cu, backend="torch")
    _check(o, bf.selected_attention(q, k, v, idx, ls, scale, cu), dtype)
    o = nsa.sliding_window_attention(q, k, v, window=w, cu_seqlens=cu, backend="torch")
    _check(o, bf.sliding_window_attention(q, k, v, w, scale, cu), dtype)


@pytest.mark.parametrize("case", CASES, ids=_ids(CASES))
@pytest.mark.usefixtures("chunk_sizes")
def test_attention_float32_matches_brute_force(case):
    _run_all(case, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.usefixtures("chunk_sizes")
def test_attention_low_precision_and_float64(dtype):
    _run_all(CASES[3], dtype)


@pytest.mark.parametrize("case", VARLEN, ids=[str(c[-1]) for c in VARLEN])
@pytest.mark.usefixtures("chunk_sizes")
def test_attention_varlen_matches_brute_force(case):
    """The brute force masks documents globally, so any leak across documents shows."""
    H, Hkv, Dk, Dv, l, d, ls, n, w, cu = case
    cu = torch.tensor(cu, dtype=torch.int32)
    _run_all((1, int(cu[-1]), H, Hkv, Dk, Dv, l, d, ls, n, w), torch.float32, cu)


def test_selected_all_invalid_gives_zero():
    """A query whose selection holds no valid token gets 0 (and no NaN)."""
    q, k, v, _, _ = bf.make_inputs(1, 70, 4, 2, 8, 8, 16, 8)
    idx = torch.full((1, 70, 2, 3), -1, dtype=torch.int32)
    idx[:, 40:, :, 0] = 1  # block 1 = tokens 32..63: causal for t >= 40
    idx[:, 10, :, 1] = 3  # non-causal block only
    o = nsa.selected_attention(q, k, v, idx, select_len=32, backend="torch")
    assert (o[:, :40] == 0).all() and (o[:, 40:].abs().sum((-1, -2)) > 0).all()


@pytest.mark.usefixtures("chunk_sizes")
def test_no_visible_block_has_zero_finite_gradients():
    """Queries before the first complete compressed block: o = 0, lse = -inf, gradients 0, no NaN."""
    q, _, _, kc, vc = bf.make_inputs(1, 40, 4, 2, 8, 8, 16, 8, dtype=torch.float64)
    for x in (q, kc, vc):
        x.requires_grad_(True)
    o, lse = nsa.compressed_attention(q, kc, vc, block_len=16, stride=8)
    assert torch.isinf(lse[:, :15]).all() and torch.isfinite(lse[:, 15:]).all()
    (o.sum() + torch.where(torch.isfinite(lse), lse, 0).sum()).backward()
    assert all(torch.isfinite(x.grad).all() for x in (q, kc, vc))
    assert (q.grad[:, :15] == 0).all() and (q.grad[:, 15:].abs().sum() > 0)
