"""Fused Triton block selection for the NSA selected branch (NSA_SPEC, "Selected branch").

One program handles a tile of ``BLOCK_T`` query positions of one document and one KV
head. It recomputes the compressed scores ``q.k_cmp * scale`` tile by tile, turns them
into probabilities ``exp(s - lse)`` (``lse`` from the compressed branch, or from an
lse-only first pass), sums over the ``G`` heads of the group, aggregates them onto
selection blocks with the overlap weights, forces the initial and local blocks and
keeps a running top-n per query in registers. Nothing of size ``[T, Nc]`` ever reaches
global memory; the only output is ``block_indices [B, T, Hkv, n]`` int32.

Ties and summation order: the score of selection block ``j`` is computed by the same
sequence of float operations for every ``j`` (``S[j] = sum_o c(o) * P[r*j + o]`` with
the offsets ``o`` in a fixed order and ``P`` a fixed-order sum over heads), so blocks
whose scores are exactly equal in exact arithmetic because their inputs are equal
(e.g. all-zero blocks) tie here too, and ties go to the lower block index.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa.ops.triton_utils import (
    batch_cu_seqlens,
    compressed_cu_seqlens,
    doc_tiles,
    dot_nt,
    dot_precision,
    interpreter_upcast,
    is_interpreter,
    load_split,
    split_dim,
)

__all__ = ["select_blocks", "compressed_attention_and_select"]

_FORCED = 1.0e30  # score of forced (initial/local) blocks: above any real score (<= G * l/d * l'/d)
_BIG = 1 << 30  # index sentinel for empty top-n slots


@triton.jit
def _select_kernel(
    Q, K, LSE, OUT, TILES, CU, CU_CMP,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_lt, stride_lh, stride_ot, stride_oh,
    scale,
    G: tl.constexpr, GP: tl.constexpr, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
    LEN: tl.constexpr, STRIDE: tl.constexpr, R: tl.constexpr, LU: tl.constexpr, SEL: tl.constexpr,
    NSEL: tl.constexpr, NP: tl.constexpr, NUM_INIT: tl.constexpr, NUM_LOCAL: tl.constexpr,
    HAS_LSE: tl.constexpr, PREC: tl.constexpr,
):
    pid = tl.program_id(0)
    hkv = tl.program_id(1)
    doc = tl.load(TILES + pid * 3).to(tl.int64)
    t0 = tl.load(TILES + pid * 3 + 1).to(tl.int64)
    t_end = tl.load(TILES + pid * 3 + 2).to(tl.int64)
    if t0 >= t_end:
        return
    d0 = tl.load(CU + doc).to(tl.int64)
    c0 = tl.load(CU_CMP + doc).to(tl.int64)
    n_cmp = tl.load(CU_CMP + doc + 1).to(tl.int64) - c0

    M: tl.constexpr = BLOCK_T * GP
    rows = tl.arange(0, M)
    r_t = t0 + rows // GP  # flattened token of each row
    r_g = rows % GP
    r_ok = (r_t < t_end) & (r_g < G)
    r_rel = r_t - d0  # position inside the document
    heads = hkv * G + r_g
    q1, q2 = load_split(Q, r_t * stride_qt + heads * stride_qh, r_ok, DK, DK1, DK2)
    t_last = tl.minimum(t0 + BLOCK_T, t_end) - 1 - d0  # last position of the tile (relative)

    # log-sum-exp of each row over its visible compressed blocks
    if HAS_LSE:
        lse = tl.load(LSE + r_t * stride_lt + heads * stride_lh, mask=r_ok, other=0.0).to(tl.float32)
    else:
        m_i = tl.full([M], float("-inf"), tl.float32)
        l_i = tl.zeros([M], tl.float32)
        n_vis_last = tl.where(t_last >= LEN - 1, (t_last - LEN + 1) // STRIDE + 1, 0)
        offs_c = tl.arange(0, BLOCK_C)
        for c_start in range(0, n_vis_last, BLOCK_C):
            ci = c_start + offs_c
            k1, k2 = load_split(K, (c0 + ci) * stride_kt + hkv * stride_kh, ci < n_cmp, DK, DK1, DK2)
            s = dot_nt(q1, q2, k1, k2, DK2, PREC) * scale
            vis = (ci[None, :] * STRIDE + LEN - 1 <= r_rel[:, None]) & r_ok[:, None]
            s = tl.where(vis, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(s - m_safe[:, None]), 1)
            m_i = m_new
        lse = tl.where(l_i > 0, m_i + tl.log(tl.where(l_i > 0, l_i, 1.0)), 0.0)

    # running top-n per query position: values and block indices
    T_rows = t0 + tl.arange(0, BLOCK_T)
    t_rel = T_rows - d0
    jt = t_rel // SEL  # block holding each query
    slot = tl.arange(0, NP)
    run_v = tl.where(slot[None, :] < NSEL, float("-inf"), float("inf")) + tl.zeros([BLOCK_T, NP], tl.float32)
    run_j = (1 << 30) + slot[None, :] + tl.zeros([BLOCK_T, NP], tl.int32)

    offs_j = tl.arange(0, BLOCK_J)
    n_blocks = t_last // SEL + 1
    for j0 in range(0, n_blocks, BLOCK_J):
        jj = j0 + offs_j
        rows_score = tl.zeros([M, BLOCK_J], tl.float32)  # per (position, head) row
        for o in tl.static_range(R + LU - 1):
            off = o - (LU - 1)
            # number of (m, u) pairs with m - u == off, m < R, u < LU: the overlap weight
            # (a trapezoid in o: 1, 2, .., min(R, LU), .., 2, 1)
            weight = tl.minimum(tl.minimum(o + 1, R + LU - 1 - o), tl.minimum(R, LU)).to(tl.float32)
            ci = jj * R + off
            k1, k2 = load_split(K, (c0 + ci) * stride_kt + hkv * stride_kh, (ci >= 0) & (ci < n_cmp),
                                DK, DK1, DK2)
            s = dot_nt(q1, q2, k1, k2, DK2, PREC) * scale
            vis = (ci[None, :] >= 0) & (ci[None, :] * STRIDE + LEN - 1 <= r_rel[:, None]) & r_ok[:, None]
            rows_score += weight * tl.where(vis, tl.exp(s - lse[:, None]), 0.0)
        # group sum once per tile (the same operation order for every block j, so exact ties stay ties)
        score = tl.sum(tl.reshape(rows_score, [BLOCK_T, GP, BLOCK_J]), 1)
        causal = jj[None, :] <= jt[:, None]
        forced = (jj[None, :] < NUM_INIT) | (jj[None, :] > jt[:, None] - NUM_LOCAL)
        score = tl.where(forced, 1.0e30, score)
        score = tl.where(causal, score, float("-inf"))
        # merge the tile into the running top-n; tile blocks come after all earlier ones,
        # so a tile value only wins a tie against a later index (lexicographic order)
        go = j0 >= 0
        while go:
            c_v = tl.max(score, 1)
            c_j = (tl.argmax(score, 1, tie_break_left=True) + j0).to(tl.int32)
            w_v = tl.min(run_v, 1)
            w_j = tl.max(tl.where(run_v == w_v[:, None], run_j, -1), 1)
            better = ((c_v > w_v) | ((c_v == w_v) & (c_j < w_j))) & (c_v > float("-inf"))
            repl = better[:, None] & (run_v == w_v[:, None]) & (run_j == w_j[:, None])
            run_v = tl.where(repl, c_v[:, None], run_v)
            run_j = tl.where(repl, c_j[:, None], run_j)
            score = tl.where((jj[None, :] == c_j[:, None]) & better[:, None], float("-inf"), score)
            go = tl.max(better.to(tl.int32), 0) > 0

    out = tl.sort(run_j, 1)
    out = tl.where(out >= (1 << 30), -1, out)
    o_mask = (T_rows < t_end)[:, None] & (slot[None, :] < NSEL)
    tl.store(OUT + T_rows[:, None] * stride_ot + hkv * stride_oh + slot[None, :], out, mask=o_mask)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    *,
    block_len: int,
    stride: int,
    select_len: int,
    num_select: int,
    num_init: int = 1,
    num_local: int = 2,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
    lse: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Top-n selection blocks per query and KV head: int32 ``[B, T, Hkv, num_select]``.

    q ``[B, T, H, Dk]``, k_cmp ``[B, Nc, Hkv, Dk]`` (packed per document with
    ``cu_seqlens``), lse ``[B, T, H]`` float32 from the compressed branch or None.
    Indices are sorted ascending with ``-1`` padding last (NSA_SPEC, top-n).
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    return torch.ops.nsa.select_blocks(
        q, k_cmp, lse, cu_seqlens, block_len, stride, select_len, num_select, num_init, num_local, float(scale)
    )


def compressed_attention_and_select(q, k_cmp, v_cmp, *, block_len, stride, select_len, num_select, num_init=1,
                                    num_local=2, scale=None, cu_seqlens=None):
    """The compressed-attention kernel, then the selection kernel from its ``lse`` (the fusion
    the torch backend does in one pass is already inside the selection kernel here)."""
    from nsa.ops.compressed_attention.triton import compressed_attention

    blk = dict(block_len=block_len, stride=stride, scale=scale, cu_seqlens=cu_seqlens)
    o, lse = compressed_attention(q, k_cmp, v_cmp, **blk)
    idx = select_blocks(q, k_cmp, **blk, select_len=select_len, num_select=num_select, num_init=num_init,
                        num_local=num_local, lse=lse)
    return o, lse, idx


def _select_blocks_impl(q, k_cmp, lse, cu_seqlens, block_len, stride, select_len, num_select,
                        num_init, num_local, scale):
    B, T, H, Dk = q.shape
    Hkv = k_cmp.shape[2]
    G = H // Hkv
    out = torch.full((B, T, Hkv, num_select), -1, dtype=torch.int32, device=q.device)
    if B * T == 0:
        return out
    q, k_cmp = interpreter_upcast(q, k_cmp)
    if k_cmp.dtype != q.dtype:
        k_cmp = k_cmp.to(q.dtype)
    if cu_seqlens is None:
        cu = batch_cu_seqlens(B, T, q.device)
        n_cmp = k_cmp.shape[1]
        cu_cmp = torch.arange(B + 1, dtype=torch.int32, device=q.device) * n_cmp
    else:
        cu = cu_seqlens.to(torch.int32)
        cu_cmp = compressed_cu_seqlens(cu, block_len, stride)
    qf = q.reshape(B * T, H, Dk)
    kf = k_cmp.reshape(-1, Hkv, Dk)
    if kf.shape[0] == 0:  # no complete compressed block anywhere: keep one dummy row to address
        kf = torch.zeros(1, Hkv, Dk, dtype=q.dtype, device=q.device)
    of = out.view(B * T, Hkv, num_select)
    if lse is not None:
        lf = lse.reshape(B * T, H)
    else:
        lf = torch.empty(1, 1, dtype=torch.float32, device=q.device)
    GP = triton.next_power_of_2(G)
    # 64 query rows x 32 blocks, 8 warps: no register spills at Dk = 64..192, G = 1..32
    # (ptxas resource usage for sm_90); the interpreter gets small tiles for speed
    block_t = max(1, 64 // GP) if not is_interpreter() else max(1, 16 // GP)
    block_j = 32 if not is_interpreter() else 16
    tiles = doc_tiles(cu, B * T, block_t)
    dk1, dk2 = split_dim(Dk)
    nsel_p = triton.next_power_of_2(num_select)
    grid = (tiles.shape[0], Hkv)
    _select_kernel[grid](
        qf, kf, lf, of, tiles, cu, cu_cmp,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), lf.stride(0), lf.stride(1),
        of.stride(0), of.stride(1),
        scale,
        G=G, GP=GP, DK=Dk, DK1=dk1, DK2=dk2, BLOCK_T=block_t, BLOCK_J=block_j, BLOCK_C=block_j,
        LEN=block_len, STRIDE=stride, R=select_len // stride, LU=block_len // stride, SEL=select_len,
        NSEL=num_select, NP=nsel_p, NUM_INIT=num_init, NUM_LOCAL=num_local,
        HAS_LSE=lse is not None, PREC=dot_precision(q.dtype),
        **({} if is_interpreter() else {"num_warps": 8, "num_stages": 2}),
    )
    return out


@torch.library.custom_op("nsa::select_blocks", mutates_args=())
def _select_blocks_op(
    q: torch.Tensor, k_cmp: torch.Tensor, lse: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
    block_len: int, stride: int, select_len: int, num_select: int, num_init: int, num_local: int,
    scale: float,
) -> torch.Tensor:
    return _select_blocks_impl(q, k_cmp, lse, cu_seqlens, block_len, stride, select_len, num_select,
                               num_init, num_local, scale)


@_select_blocks_op.register_fake
def _(q, k_cmp, lse, cu_seqlens, block_len, stride, select_len, num_select, num_init, num_local, scale):
    B, T = q.shape[:2]
    return q.new_empty((B, T, k_cmp.shape[2], num_select), dtype=torch.int32)
