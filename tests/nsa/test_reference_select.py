"""Block selection (torch reference) against the spec: brute force, hand-worked scores, ties."""

import math

import pytest
import torch

import nsa
from tests.nsa import brute_force as bf

# B, T, H, Hkv, Dk, l, d, l', n, n_init, n_local
CASES = [
    (1, 5, 2, 1, 8, 16, 8, 32, 3, 1, 2),  # shorter than one block: only forced / -1
    (2, 150, 4, 2, 8, 16, 8, 32, 4, 1, 2),
    (1, 230, 8, 1, 8, 32, 16, 64, 3, 1, 2),  # paper l, d, l' (weights 1,2,2,2,1), G = 8
    (3, 77, 2, 2, 8, 8, 8, 8, 5, 0, 1),  # l = d = l': S = P, no init block, G = 1
    (1, 180, 16, 1, 4, 16, 4, 32, 6, 2, 0),  # G = 16, no local blocks
    (2, 99, 4, 1, 8, 8, 4, 16, 4, 1, 3),  # n_init + n_local == n
]


def _select(q, kc, case, cu=None, lse=None):
    _, _, _, _, _, l, d, ls, n, ni, nl = case
    return nsa.select_blocks(
        q,
        kc,
        block_len=l,
        stride=d,
        select_len=ls,
        num_select=n,
        num_init=ni,
        num_local=nl,
        cu_seqlens=cu,
        backend="torch",
        lse=lse,
    )


def _brute(q, kc, case, cu=None):
    _, _, _, _, Dk, l, d, ls, n, ni, nl = case
    return bf.select_blocks(q, kc, l, d, ls, n, ni, nl, Dk**-0.5, cu)


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}G{c[2] // c[3]}l{c[5]}d{c[6]}ls{c[7]}" for c in CASES])
@pytest.mark.usefixtures("chunk_sizes")
def test_select_float64_equals_brute_force(case):
    """In float64 both sides compute the same scores, so the indices must agree exactly."""
    B, T, H, Hkv, Dk, l, d = case[:7]
    q, _, _, kc, _ = bf.make_inputs(B, T, H, Hkv, Dk, Dk, l, d, dtype=torch.float64)
    idx = _select(q, kc, case)
    assert idx.dtype == torch.int32 and idx.shape == (B, T, Hkv, case[8])
    ref, _ = _brute(q, kc, case)
    assert torch.equal(idx.long(), ref)
    # with the compressed branch's lse the result is the same
    _, lse = nsa.compressed_attention(q, kc, kc, block_len=l, stride=d, backend="torch")
    assert torch.equal(_select(q, kc, case, lse=lse), idx)


@pytest.mark.usefixtures("chunk_sizes")
def test_select_varlen_float64_equals_brute_force():
    case = (1, 200, 4, 2, 8, 16, 8, 32, 4, 1, 2)
    cu = torch.tensor([0, 7, 100, 100, 140, 200], dtype=torch.int32)
    q, _, _, kc, _ = bf.make_inputs(1, 200, 4, 2, 8, 8, 16, 8, cu, dtype=torch.float64)
    assert torch.equal(_select(q, kc, case, cu).long(), _brute(q, kc, case, cu)[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_select_low_precision_picks_top_scores(dtype):
    """In float32/bf16 near-ties may flip, so check the defining property instead: every
    chosen free block scores (by the float64 brute force) at least as high as every causal
    block left out, up to 1e-4 (float32 scores: ~1e-6 relative; bf16 inputs are rounded
    before both sides, so only the float32 accumulation differs)."""
    case = (2, 230, 8, 2, 8, 32, 16, 64, 4, 1, 2)
    q, _, _, kc, _ = bf.make_inputs(2, 230, 8, 2, 8, 8, 32, 16, dtype=dtype)
    idx = _select(q, kc, case)
    ref_idx, scores = _brute(q.double(), kc.double(), case)
    for (b, t, g), S in scores.items():
        chosen = {int(j) for j in idx[b, t, g] if j >= 0}
        assert len(chosen) == min(4, len(S)) and chosen <= set(S)
        forced = {j for j in S if j < 1 or j > t // 64 - 2}
        assert forced <= chosen
        free, left = chosen - forced, set(S) - chosen
        if free and left:
            assert min(S[j] for j in free) >= max(S[j] for j in left) - 1e-4
    assert (idx.long() == ref_idx).float().mean() > 0.95


def test_overlap_weights_hand_worked():
    """l=32, d=16, l'=64: block j weighs compressed blocks 4j-1..4j+3 by 1,2,2,2,1.

    One head, Dk = 1, scale 1, q = 1 and k_cmp[i] = log P[i], so the compressed probabilities
    of the last query (t = 640, visible blocks 0..38) are exactly P. With
    P[15] = .3, P[16] = .2, P[24] = .35, P[27] = .15 (rest 0):
        S[3] = 1*P[15]            = .30      S[6] = 2*P[24] + 1*P[27] = .85
        S[4] = 1*P[15] + 2*P[16]  = .70      S[7] = 1*P[27]           = .15
    Forced: block 0 (init) and blocks 9, 10 (local, t // 64 = 10); two free slots go to 6
    and 4. (Counting only blocks that start inside j would give S[3] = .3 > S[4] = .2 and
    pick 3 instead of 4.)
    """
    T, l, d, ls = 641, 32, 16, 64
    Nc = (T - l) // d + 1
    P = torch.zeros(Nc, dtype=torch.float64)
    P[15], P[16], P[24], P[27] = 0.3, 0.2, 0.35, 0.15
    k_cmp = torch.where(P > 0, P.log(), torch.full_like(P, -1e4)).view(1, Nc, 1, 1)
    q = torch.ones(1, T, 1, 1, dtype=torch.float64)
    idx = nsa.select_blocks(q, k_cmp, block_len=l, stride=d, select_len=ls, num_select=5, scale=1.0)
    assert idx[0, -1, 0].tolist() == [0, 4, 6, 9, 10]
    _, _, p = bf.attend(q[:, -1:], k_cmp, k_cmp, torch.ones(1, 1, 1, Nc, dtype=torch.bool), 1.0)
    assert math.isclose(p[0, 0, 0, 24].item(), 0.35, rel_tol=1e-12)
    # the overlap weights themselves, on a one-hot P per position: 1, 2, 2, 2, 1 around 4j
    from nsa.ops.select_blocks.reference import overlap_scores

    eye = torch.eye(40, dtype=torch.float64)  # P = e_i for i = 0..39
    S = overlap_scores(eye, l, d, ls, 10)  # [i, j]
    assert S[:, 5].nonzero()[:, 0].tolist() == [19, 20, 21, 22, 23]
    assert S[19:24, 5].tolist() == [1.0, 2.0, 2.0, 2.0, 1.0]


def test_ties_go_to_lower_index_and_padding():
    """k_cmp = 0 gives a uniform softmax, so with l = d = l' every visible block has the same
    score (the current block, not yet complete, has 0): the free slots must take the lowest
    indices among the tied blocks; fewer causal blocks than n -> all of them, then -1."""
    T, l, d, ls, n = 200, 16, 16, 16, 4
    q = torch.randn(1, T, 2, 8)
    k_cmp = torch.zeros(1, (T - l) // d + 1, 1, 8)
    idx = nsa.select_blocks(
        q, k_cmp, block_len=l, stride=d, select_len=ls, num_select=n, num_init=1, num_local=1
    )
    for t in (0, 17, 40, 120, 199):
        cur = t // ls
        expect = sorted({0, cur} | set(sorted(set(range(cur + 1)) - {0, cur})[: n - len({0, cur})]))
        assert idx[0, t, 0].tolist() == expect + [-1] * (n - len(expect)), t


def _fused(q, kc, vc, case, cu=None):
    _, _, _, _, _, l, d, ls, n, ni, nl = case
    return nsa.compressed_attention_and_select(q, kc, vc, block_len=l, stride=d, select_len=ls, num_select=n,
                                               num_init=ni, num_local=nl, cu_seqlens=cu, backend="torch")


@pytest.mark.parametrize("case", CASES, ids=[f"T{c[1]}G{c[2] // c[3]}l{c[5]}d{c[6]}ls{c[7]}" for c in CASES])
@pytest.mark.usefixtures("chunk_sizes")
def test_fused_compressed_and_select_equals_separate_calls(case):
    """The layer's one-pass path: same blocks as the brute force, same o/lse and gradients as
    compressed_attention (float64, so scores tie only where the spec makes them tie)."""
    B, T, H, Hkv, Dk, l, d = case[:7]
    q, _, _, kc, vc = bf.make_inputs(B, T, H, Hkv, Dk, Dk + 3, l, d, dtype=torch.float64)
    q, kc, vc = (x.requires_grad_(True) for x in (q, kc, vc))
    o, lse, idx = _fused(q, kc, vc, case)
    assert idx.dtype == torch.int32 and idx.shape == (B, T, Hkv, case[8])
    assert torch.equal(idx.long(), _brute(q.detach(), kc.detach(), case)[0])
    o_ref, lse_ref = nsa.compressed_attention(q, kc, vc, block_len=l, stride=d, backend="torch")
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
    w = torch.randn_like(o)
    g = torch.autograd.grad((o * w).sum(), (q, kc, vc))
    g_ref = torch.autograd.grad((o_ref * w).sum(), (q, kc, vc))
    assert all(torch.equal(a, b) for a, b in zip(g, g_ref, strict=True))


@pytest.mark.usefixtures("chunk_sizes")
def test_fused_compressed_and_select_varlen():
    case = (1, 200, 4, 2, 8, 16, 8, 32, 4, 1, 2)
    cu = torch.tensor([0, 7, 100, 100, 140, 200], dtype=torch.int32)
    q, _, _, kc, vc = bf.make_inputs(1, 200, 4, 2, 8, 8, 16, 8, cu, dtype=torch.float64)
    o, lse, idx = _fused(q, kc, vc, case, cu)
    assert torch.equal(idx.long(), _brute(q, kc, case, cu)[0])
    o_ref, lse_ref = nsa.compressed_attention(q, kc, vc, block_len=16, stride=8, cu_seqlens=cu, backend="torch")
    assert torch.equal(o, o_ref) and torch.equal(lse, lse_ref)
