"""Triton block selection against the torch backend.

On CPU the kernel runs in the Triton interpreter in float32 and float16 (bfloat16 only on
CUDA: the interpreter's bf16 math is wrong, triton issue 11584).

How indices are compared. Both backends must pick the same blocks. Exact ties in the
reference (equal scores from equal inputs, e.g. uniform probabilities or all-zero blocks)
must resolve identically (lower index wins): ``test_exact_ties_*`` require bitwise equal
output. On random inputs the two backends sum the same probabilities in different orders,
so two blocks whose true scores differ by less than float32 rounding may swap. The check
allows a difference only as such a swap: every block one backend picked and the other did
not must have a float64 reference score within ``SWAP_TOL = 1e-5`` of the blocks it
replaced. Scores are sums of at most ``G * l/d * l'/d`` probabilities (<= 64 here), each
computed in float32 (relative error ~1e-6), so gaps above 1e-5 are real and must agree.
"""

import pytest
import torch

import nsa
from nsa.ops.select_blocks.reference import overlap_scores

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if CUDA else [])
SWAP_TOL = 1e-5


def n_cmp(L, l, d):
    return (L - l) // d + 1 if L >= l else 0


def true_scores(q, k, l, d, sel, scale):
    """float64 ``S [T, Hkv, Ns]`` of one document (dense; tiny inputs only)."""
    T, H, _ = q.shape
    Hkv, G, Nc = k.shape[1], q.shape[1] // k.shape[1], k.shape[0]
    s = torch.einsum("thd,chd->thc", q.double(), k.double().repeat_interleave(G, 1)) * scale
    vis = torch.arange(Nc)[None, :] * d + l - 1 <= torch.arange(T)[:, None]
    p = torch.softmax(s.masked_fill(~vis[:, None, :].to(s.device), float("-inf")), -1).nan_to_num(0.0)
    P = p.view(T, Hkv, G, Nc).sum(2)
    return overlap_scores(P, l, d, sel, -(-T // sel))


def assert_same_selection(got, ref, S):
    """``got``/``ref [T, Hkv, n]``: equal, or differing only by swaps of near-tied blocks."""
    for t, h in (got != ref).any(-1).nonzero().tolist():
        a, b = set(got[t, h].tolist()), set(ref[t, h].tolist())
        extra, missing = sorted(a - b), sorted(b - a)
        assert len(extra) == len(missing) and -1 not in extra + missing, (t, h, got[t, h], ref[t, h])
        gap = max(abs(S[t, h, x] - S[t, h, y]).item() for x in extra for y in missing)
        assert gap < SWAP_TOL, f"t={t} h={h}: {got[t, h].tolist()} vs {ref[t, h].tolist()}, gap {gap:.2e}"


CASES = {
    # lens, H, Hkv, Dk, l, d, l', n, num_init, num_local
    "G2_oddT": ([45], 4, 2, 32, 8, 4, 16, 4, 1, 2),
    "G1_varlen_short_doc": ([5, 37, 20], 2, 2, 16, 16, 8, 32, 3, 1, 1),
    "G4_l_eq_lsel": ([33], 8, 2, 24, 16, 8, 16, 2, 0, 1),
    "G16_l_eq_d_eq_lsel": ([29], 16, 1, 16, 8, 8, 8, 3, 1, 1),
    "G2_many_blocks": ([150], 2, 1, 16, 4, 4, 4, 5, 1, 2),  # 38 blocks: the score row is tiled
}


def _run(case, dtype, use_lse, seed=0, zero_q=False):
    lens, H, Hkv, Dk, l, d, sel, n, ni, nl = CASES[case]
    g = torch.Generator().manual_seed(seed)
    T, Nc = sum(lens), sum(n_cmp(L, l, d) for L in lens)
    q = torch.randn(1, T, H, Dk, generator=g) * (0 if zero_q else 1)
    k = torch.randn(1, Nc, Hkv, Dk, generator=g)
    q, k = q.to(DEVICE, dtype), k.to(DEVICE, dtype)
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    cu = cu if len(lens) > 1 else None
    lse = None
    if use_lse:
        v = torch.zeros(1, Nc, Hkv, 16, dtype=dtype, device=DEVICE)
        _, lse = nsa.compressed_attention(q, k, v, block_len=l, stride=d, scale=0.3, cu_seqlens=cu, backend="torch")
    kw = dict(block_len=l, stride=d, select_len=sel, num_select=n, num_init=ni, num_local=nl, scale=0.3,
              cu_seqlens=cu, lse=lse)
    got = nsa.select_blocks(q, k, backend="triton", **kw)
    ref = nsa.select_blocks(q, k, backend="torch", **kw)
    assert got.dtype == torch.int32 and got.shape == (1, T, Hkv, n)
    return got, ref, q, k, lens, (l, d, sel)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_matches_torch(case, dtype):
    got, ref, q, k, lens, (l, d, sel) = _run(case, dtype, use_lse=case == "G2_oddT")
    t0 = c0 = 0
    for L in lens:
        c = n_cmp(L, l, d)
        S = true_scores(q[0, t0:t0 + L].cpu(), k[0, c0:c0 + c].cpu(), l, d, sel, 0.3)
        assert_same_selection(got[0, t0:t0 + L].cpu(), ref[0, t0:t0 + L].cpu(), S)
        t0, c0 = t0 + L, c0 + c


def test_padding_and_forced_blocks():
    """Early queries have fewer causal blocks than n: all of them, then -1; forced blocks
    (first and most recent) are always in; indices ascending."""
    got, _, _, _, _, (l, d, sel) = _run("G2_oddT", torch.float32, use_lse=False)
    idx = got[0].cpu()
    t = torch.arange(idx.shape[0])
    n_causal = t // sel + 1
    valid = idx >= 0
    assert torch.equal(valid.sum(-1), n_causal.clamp(max=idx.shape[-1])[:, None].expand_as(valid.sum(-1)))
    assert (idx[..., 0] == 0).all() and ((idx == (t // sel)[:, None, None]).any(-1)).all()
    big = idx.masked_fill(~valid, 1 << 20)
    assert ((big[..., 1:] > big[..., :-1]) | ~valid[..., 1:]).all()


def test_batch_shorter_than_one_block():
    """B = 2 rows of T = 6 < l: no compressed block; the one causal block 0, then -1 padding."""
    q = torch.randn(2, 6, 4, 16, device=DEVICE)
    k = torch.zeros(2, 0, 2, 16, device=DEVICE)
    kw = dict(block_len=8, stride=4, select_len=8, num_select=3, num_init=1, num_local=1)
    got = nsa.select_blocks(q, k, backend="triton", **kw)
    assert torch.equal(got, nsa.select_blocks(q, k, backend="torch", **kw))
    assert (got[..., 0] == 0).all() and (got[..., 1:] == -1).all()


@pytest.mark.parametrize("case", ["G2_many_blocks", "G1_varlen_short_doc"])
def test_exact_ties_match_bitwise(case):
    """q = 0: every visible compressed block has the same probability, so interior selection
    blocks tie exactly; the lower index must win in both backends."""
    got, ref, *_ = _run(case, torch.float32, use_lse=False, zero_q=True)
    assert torch.equal(got, ref)


def test_custom_op_registration():
    """The op passes torch.library.opcheck (schema, fake kernel, no autograd needed)."""
    import nsa.ops.select_blocks.triton  # noqa: F401  (registers the op)

    q = torch.randn(1, 13, 2, 16, device=DEVICE)
    k = torch.randn(1, 2, 1, 16, device=DEVICE)
    torch.library.opcheck(torch.ops.nsa.select_blocks.default, (q, k, None, None, 8, 4, 8, 2, 1, 1, 0.25))


def test_compile_fullgraph():
    """torch.compile traces the custom op without graph breaks."""
    from nsa.ops.select_blocks.triton import select_blocks

    q = torch.randn(1, 20, 2, 16, device=DEVICE)
    k = torch.randn(1, 4, 1, 16, device=DEVICE)
    fn = lambda q, k: select_blocks(q, k, block_len=8, stride=4, select_len=8, num_select=2)
    out = torch.compile(fn, fullgraph=True, backend="inductor" if CUDA else "aot_eager")(q, k)
    assert torch.equal(out, fn(q, k))


def test_fused_compressed_and_select_matches_torch():
    """``compressed_attention_and_select``: the triton pair of kernels against the torch
    one-pass path, varlen with a document shorter than one block."""
    lens, H, Hkv, Dk, l, d, sel, n, ni, nl = CASES["G1_varlen_short_doc"]
    g = torch.Generator().manual_seed(3)
    T, Nc = sum(lens), sum(n_cmp(L, l, d) for L in lens)
    q, k, v = (torch.randn(1, s, h, Dk, generator=g).to(DEVICE) for s, h in ((T, H), (Nc, Hkv), (Nc, Hkv)))
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    kw = dict(block_len=l, stride=d, select_len=sel, num_select=n, num_init=ni, num_local=nl, scale=0.3,
              cu_seqlens=cu)
    o, lse, idx = nsa.compressed_attention_and_select(q, k, v, backend="triton", **kw)
    o_ref, lse_ref, idx_ref = nsa.compressed_attention_and_select(q, k, v, backend="torch", **kw)
    fin = torch.isfinite(lse_ref)
    assert torch.equal(fin, torch.isfinite(lse))
    assert ((o - o_ref).norm() / o_ref.norm()).item() < 1e-5  # float32 in both: rounding only
    assert ((lse[fin] - lse_ref[fin]).norm() / lse_ref[fin].norm()).item() < 1e-5
    t0 = c0 = 0
    for L in lens:
        c = n_cmp(L, l, d)
        S = true_scores(q[0, t0:t0 + L].cpu(), k[0, c0:c0 + c].cpu(), l, d, sel, 0.3)
        assert_same_selection(idx[0, t0:t0 + L].cpu(), idx_ref[0, t0:t0 + L].cpu(), S)
        t0, c0 = t0 + L, c0 + c
