"""Group-centric Triton kernels for the NSA selected branch (NSA_SPEC, "Kernel design").

Forward and dq: the grid runs over (query position ``t``, KV head). A program loads
the queries of the whole group ``[G, Dk]`` once, then loops over the ``n`` selected
blocks of ``t``, loading each K/V block once for all ``G`` heads, with an online softmax
(forward) or the recomputed probabilities ``exp(s - lse)`` (dq). ``tl.dot`` needs >= 16
rows, so for ``G < 16`` a program packs ``P = 16 / G`` consecutive positions of one
document and loops over the union of their selections (sorted, repeats skipped); rows
that did not select a block are masked. Neighbouring queries share most blocks (at least
the forced ones), so this loads fewer K/V blocks than one program per position.

dk/dv, deterministic without atomics: an inverted index built in torch lists, for each
(KV head, selection block), the queries that selected it in ascending ``t``. A
block-centric program keeps its K/V block in registers and walks that list, packing
``BLOCK_T`` query positions x ``G`` heads into one tile (this is also the query packing
that makes small ``G`` efficient). Long lists (the initial block is selected by every
query) are cut into fixed chunks whose float32 partial sums are reduced in a fixed
order, so the result is bitwise reproducible.
"""

from typing import Optional

import torch
import triton
import triton.language as tl

from nsa.ops.triton_utils import (
    batch_cu_seqlens,
    doc_tiles,
    dot_nt,
    dot_precision,
    is_interpreter,
    load_rows,
    load_split,
    split_dim,
)

__all__ = ["selected_attention"]

# Smallest dk/dv chunk (query entries per program). Lists longer than this are split and
# their partials reduced in order; tests lower it to exercise that path on tiny inputs.
MIN_CHUNK = 2048


@triton.jit
def _store_split(X, row_off, ok, a1, a2, D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """Store a split head dim (tiles ``a1`` = columns ``[0, D1)``, ``a2`` = ``[D1, D1 + D2)``)."""
    offs1 = tl.arange(0, D1)
    tl.store(X + row_off[:, None] + offs1[None, :], a1.to(X.dtype.element_ty),
             mask=ok[:, None] & (offs1[None, :] < D))
    if D2 > 0:
        offs2 = tl.arange(0, D2)
        tl.store(X + D1 + row_off[:, None] + offs2[None, :], a2.to(X.dtype.element_ty),
                 mask=ok[:, None] & (offs2[None, :] < D - D1))


@triton.jit
def _query_tile(TILES, CU, G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr):
    """Program -> ``P`` consecutive positions of one document x the ``G`` heads of one KV head.

    Rows are (position, head) pairs, ``P * GP`` of them (>= 16 for ``tl.dot``): packing
    positions fills the MMA rows that a small group would leave empty.
    """
    pid = tl.program_id(0)
    hkv = tl.program_id(1).to(tl.int64)
    doc = tl.load(TILES + pid * 3)
    t0 = tl.load(TILES + pid * 3 + 1).to(tl.int64)
    t_end = tl.load(TILES + pid * 3 + 2).to(tl.int64)
    d0 = tl.load(CU + doc).to(tl.int64)
    rows = tl.arange(0, P * GP)
    r_t = t0 + rows // GP
    r_g = rows % GP
    return hkv, t0, t_end, d0, r_t, hkv * G + r_g, (r_t < t_end) & (r_g < G)


@triton.jit
def _union_blocks(IDX, stride_it, stride_ih, hkv, t0, t_end, d0, NSEL: tl.constexpr, NP: tl.constexpr,
                  P: tl.constexpr, SEL: tl.constexpr):
    """Selections ``[P, NP]`` of the tile's positions (unusable -> 2**30: -1, or a block after
    the query) and their union as a sorted flat list ``[P * NP]`` with its length."""
    pt = t0 + tl.arange(0, P)
    slot = tl.arange(0, NP)
    ok = (pt < t_end)[:, None] & (slot < NSEL)[None, :]
    sel = tl.load(IDX + pt[:, None] * stride_it + hkv * stride_ih + slot[None, :], mask=ok, other=-1)
    sel = sel.to(tl.int64)
    sel = tl.where((sel >= 0) & (sel * SEL <= (pt - d0)[:, None]), sel, 1 << 30)
    flat = tl.sort(tl.reshape(sel, [P * NP]))
    return sel, flat, tl.sum((flat < (1 << 30)).to(tl.int32))


@triton.jit
def _union_step(sel, flat, i, GP: tl.constexpr, P: tl.constexpr, NP: tl.constexpr):
    """``i``-th entry of the union: block ``j``, whether it is not a repeat of entry ``i - 1``,
    and which rows selected it ``[P * GP]`` (repeated indices in a row count once)."""
    pos = tl.arange(0, P * NP)
    j = tl.max(tl.where(pos == i, flat, -1))
    prev = tl.max(tl.where(pos == i - 1, flat, -1))
    member = tl.max((sel == j).to(tl.int32), 1) > 0
    rows = tl.reshape(tl.broadcast_to(member[:, None], [P, GP]), [P * GP])
    return j, j != prev, rows


@triton.jit
def _block_scores(q1, q2, K, V, j, b, d0, hkv, member, r_rel, t_last, stride_kt, stride_kh, stride_vt,
                  stride_vh, scale, DK: tl.constexpr, DK1: tl.constexpr, DK2: tl.constexpr, DV: tl.constexpr,
                  BLOCK_DV: tl.constexpr, SEL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr):
    """Sub-block ``b`` of selected block ``j``: K tiles, V, scaled scores ``[M, BLOCK_N]`` and
    the mask of (row, key) pairs that count (row selected ``j``, key causal for the row)."""
    offs_n = tl.arange(0, BLOCK_N)
    s_rel = j * SEL + b + offs_n
    kv_ok = (s_rel <= t_last) & (b + offs_n < SEL)
    tok = d0 + s_rel
    k1, k2 = load_split(K, tok * stride_kt + hkv * stride_kh, kv_ok, DK, DK1, DK2)
    v = load_rows(V, tok * stride_vt + hkv * stride_vh, kv_ok, tl.arange(0, BLOCK_DV), DV)
    s = dot_nt(q1, q2, k1, k2, DK2, PREC) * scale
    ok = member[:, None] & kv_ok[None, :] & (s_rel[None, :] <= r_rel[:, None])
    return k1, k2, v, s, ok


@triton.jit
def _fwd_kernel(
    Q, K, V, IDX, O, LSE, TILES, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_it, stride_ih, stride_ot, stride_oh, stride_lt, stride_lh,
    scale,
    G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    DK1: tl.constexpr, DK2: tl.constexpr, DK2B: tl.constexpr, BLOCK_DV: tl.constexpr, NSEL: tl.constexpr,
    NP: tl.constexpr, SEL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    hkv, t0, t_end, d0, r_t, heads, r_ok = _query_tile(TILES, CU, G, GP, P)
    if t0 >= t_end:
        return
    BLOCK_M: tl.constexpr = P * GP
    r_rel = r_t - d0
    t_last = tl.minimum(t0 + P, t_end) - 1 - d0
    offs_dv = tl.arange(0, BLOCK_DV)
    q1, q2 = load_split(Q, r_t * stride_qt + heads * stride_qh, r_ok, DK, DK1, DK2)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    sel, flat, n_union = _union_blocks(IDX, stride_it, stride_ih, hkv, t0, t_end, d0, NSEL, NP, P, SEL)
    for i in range(n_union):
        j, new, member = _union_step(sel, flat, i, GP, P, NP)
        if new:
            for b in range(0, SEL, BLOCK_N):
                k1, k2, v, s, ok = _block_scores(q1, q2, K, V, j, b, d0, hkv, member, r_rel, t_last, stride_kt,
                                                 stride_kh, stride_vt, stride_vh, scale, DK, DK1, DK2, DV,
                                                 BLOCK_DV, SEL, BLOCK_N, PREC)
                s = tl.where(ok, s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, 1))
                m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
                p = tl.exp(s - m_safe[:, None])
                alpha = tl.exp(m_i - m_safe)
                l_i = l_i * alpha + tl.sum(p, 1)
                acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
                m_i = m_new
    has = l_i > 0
    o = acc / tl.where(has, l_i, 1.0)[:, None]
    tl.store(O + (r_t * stride_ot + heads * stride_oh)[:, None] + offs_dv[None, :], o.to(O.dtype.element_ty),
             mask=r_ok[:, None] & (offs_dv[None, :] < DV))
    lse = tl.where(has, m_i + tl.log(tl.where(has, l_i, 1.0)), float("inf"))
    tl.store(LSE + r_t * stride_lt + heads * stride_lh, lse, mask=r_ok)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, IDX, DO, LSE, DELTA, DQ, TILES, CU,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_it, stride_ih,
    stride_dot, stride_doh, stride_lt, stride_lh, stride_dqt, stride_dqh,
    scale,
    G: tl.constexpr, GP: tl.constexpr, P: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    DK1: tl.constexpr, DK2: tl.constexpr, DK2B: tl.constexpr, BLOCK_DV: tl.constexpr, NSEL: tl.constexpr,
    NP: tl.constexpr, SEL: tl.constexpr, BLOCK_N: tl.constexpr, PREC: tl.constexpr,
):
    hkv, t0, t_end, d0, r_t, heads, r_ok = _query_tile(TILES, CU, G, GP, P)
    if t0 >= t_end:
        return
    BLOCK_M: tl.constexpr = P * GP
    r_rel = r_t - d0
    t_last = tl.minimum(t0 + P, t_end) - 1 - d0
    offs_dv = tl.arange(0, BLOCK_DV)
    q1, q2 = load_split(Q, r_t * stride_qt + heads * stride_qh, r_ok, DK, DK1, DK2)
    do = load_rows(DO, r_t * stride_dot + heads * stride_doh, r_ok, offs_dv, DV)
    lse = tl.load(LSE + r_t * stride_lt + heads * stride_lh, mask=r_ok, other=float("inf"))
    delta = tl.load(DELTA + r_t * stride_lt + heads * stride_lh, mask=r_ok, other=0.0)
    dq1 = tl.zeros([BLOCK_M, DK1], tl.float32)
    dq2 = tl.zeros([BLOCK_M, DK2B], tl.float32)
    sel, flat, n_union = _union_blocks(IDX, stride_it, stride_ih, hkv, t0, t_end, d0, NSEL, NP, P, SEL)
    for i in range(n_union):
        j, new, member = _union_step(sel, flat, i, GP, P, NP)
        if new:
            for b in range(0, SEL, BLOCK_N):
                k1, k2, v, s, ok = _block_scores(q1, q2, K, V, j, b, d0, hkv, member, r_rel, t_last, stride_kt,
                                                 stride_kh, stride_vt, stride_vh, scale, DK, DK1, DK2, DV,
                                                 BLOCK_DV, SEL, BLOCK_N, PREC)
                p = tl.where(ok & r_ok[:, None], tl.exp(s - lse[:, None]), 0.0)
                dp = tl.dot(do, tl.trans(v), input_precision=PREC)
                ds = p * (dp - delta[:, None])
                ds = ds.to(k1.dtype)
                dq1 += tl.dot(ds, k1, input_precision=PREC)
                if DK2 > 0:
                    dq2 += tl.dot(ds, k2, input_precision=PREC)
    _store_split(DQ, r_t * stride_dqt + heads * stride_dqh, r_ok, dq1 * scale, dq2 * scale, DK, DK1, DK2)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, PDK, PDV, WORK, BLOCKS, TLIST,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_dot, stride_doh, stride_lt, stride_lh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh,
    scale, n_lists_per_head,
    G: tl.constexpr, GP: tl.constexpr, BLOCK_T: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
    DK1: tl.constexpr, DK2: tl.constexpr, DK2B: tl.constexpr, PW: tl.constexpr, BLOCK_DV: tl.constexpr,
    SEL: tl.constexpr, BLOCK_S: tl.constexpr,
    PREC: tl.constexpr,
):
    w = tl.program_id(0).to(tl.int64)
    lst = tl.load(WORK + w * 4).to(tl.int64)
    e_start = tl.load(WORK + w * 4 + 1).to(tl.int64)
    e_end = tl.load(WORK + w * 4 + 2).to(tl.int64)
    slot = tl.load(WORK + w * 4 + 3).to(tl.int64)
    if slot == -2:  # unused extra-chunk row
        return
    hkv = lst // n_lists_per_head
    blk = lst % n_lists_per_head
    b_start = tl.load(BLOCKS + blk * 3 + 1).to(tl.int64)
    b_end = tl.load(BLOCKS + blk * 3 + 2).to(tl.int64)
    if b_start >= b_end:  # unused block row
        return
    offs_s = tl.arange(0, BLOCK_S)
    tok = b_start + offs_s
    s_ok = (offs_s < SEL) & (tok < b_end)
    offs_dv = tl.arange(0, BLOCK_DV)
    k1, k2 = load_split(K, tok * stride_kt + hkv * stride_kh, s_ok, DK, DK1, DK2)
    v = load_rows(V, tok * stride_vt + hkv * stride_vh, s_ok, offs_dv, DV)
    dk1 = tl.zeros([BLOCK_S, DK1], tl.float32)
    dk2 = tl.zeros([BLOCK_S, DK2B], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    M: tl.constexpr = BLOCK_T * GP
    rows = tl.arange(0, M)
    r_e = rows // GP
    r_g = rows % GP
    heads = hkv * G + r_g
    for e0 in range(e_start, e_end, BLOCK_T):
        e = e0 + r_e
        r_ok = (e < e_end) & (r_g < G)
        t = tl.load(TLIST + e, mask=r_ok, other=0).to(tl.int64)
        q1, q2 = load_split(Q, t * stride_qt + heads * stride_qh, r_ok, DK, DK1, DK2)
        do = load_rows(DO, t * stride_dot + heads * stride_doh, r_ok, offs_dv, DV)
        lse = tl.load(LSE + t * stride_lt + heads * stride_lh, mask=r_ok, other=float("inf"))
        delta = tl.load(DELTA + t * stride_lt + heads * stride_lh, mask=r_ok, other=0.0)
        s = dot_nt(q1, q2, k1, k2, DK2, PREC) * scale
        ok = r_ok[:, None] & s_ok[None, :] & (tok[None, :] <= t[:, None])
        p = tl.where(ok, tl.exp(s - lse[:, None]), 0.0)
        dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
        dp = tl.dot(do, tl.trans(v), input_precision=PREC)
        ds = p * (dp - delta[:, None])
        dsT = tl.trans(ds.to(q1.dtype))
        dk1 += tl.dot(dsT, q1, input_precision=PREC)
        if DK2 > 0:
            dk2 += tl.dot(dsT, q2, input_precision=PREC)
    dk1 = dk1 * scale
    dk2 = dk2 * scale
    if slot < 0:
        _store_split(DK_OUT, tok * stride_dkt + hkv * stride_dkh, s_ok, dk1, dk2, DK, DK1, DK2)
        tl.store(DV_OUT + tok[:, None] * stride_dvt + hkv * stride_dvh + offs_dv[None, :],
                 dv.to(DV_OUT.dtype.element_ty), mask=s_ok[:, None] & (offs_dv[None, :] < DV))
    else:
        _store_split(PDK, slot * BLOCK_S * PW + offs_s * PW, offs_s >= 0, dk1, dk2, DK, DK1, DK2)
        tl.store(PDV + slot * BLOCK_S * BLOCK_DV + offs_s[:, None] * BLOCK_DV + offs_dv[None, :], dv)


@triton.jit
def _bwd_reduce_kernel(
    DK_OUT, DV_OUT, PDK, PDV, SLOTS, BLOCKS,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, n_lists_per_head,
    DK: tl.constexpr, DV: tl.constexpr, BLOCK_DK: tl.constexpr, PW: tl.constexpr, BLOCK_DV: tl.constexpr,
    SEL: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """Sum the chunk partials of one long list in slot order (deterministic)."""
    lst = tl.program_id(0).to(tl.int64)
    first = tl.load(SLOTS + lst * 2).to(tl.int64)
    count = tl.load(SLOTS + lst * 2 + 1).to(tl.int64)
    if count == 0:
        return
    hkv = lst // n_lists_per_head
    blk = lst % n_lists_per_head
    b_start = tl.load(BLOCKS + blk * 3 + 1).to(tl.int64)
    b_end = tl.load(BLOCKS + blk * 3 + 2).to(tl.int64)
    offs_s = tl.arange(0, BLOCK_S)
    tok = b_start + offs_s
    s_ok = (offs_s < SEL) & (tok < b_end)
    offs_dk = tl.arange(0, BLOCK_DK)
    offs_dv = tl.arange(0, BLOCK_DV)
    dk = tl.zeros([BLOCK_S, BLOCK_DK], tl.float32)
    dv = tl.zeros([BLOCK_S, BLOCK_DV], tl.float32)
    for c in range(first, first + count):
        dk += load_rows(PDK, c * BLOCK_S * PW + offs_s * PW, offs_s >= 0, offs_dk, DK)
        dv += tl.load(PDV + c * BLOCK_S * BLOCK_DV + offs_s[:, None] * BLOCK_DV + offs_dv[None, :])
    tl.store(DK_OUT + tok[:, None] * stride_dkt + hkv * stride_dkh + offs_dk[None, :],
             dk.to(DK_OUT.dtype.element_ty), mask=s_ok[:, None] & (offs_dk[None, :] < DK))
    tl.store(DV_OUT + tok[:, None] * stride_dvt + hkv * stride_dvh + offs_dv[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=s_ok[:, None] & (offs_dv[None, :] < DV))


def _pow2(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _dk_split(dk: int) -> dict:
    """Kernel constants of the split key head dim (see ``split_dim``); DK2B sizes an unused
    accumulator when there is no second tile."""
    d1, d2 = split_dim(dk)
    return {"DK1": d1, "DK2": d2, "DK2B": max(d2, 16)}


def _launch_cfg(dk: int, dv: int) -> dict:
    """num_warps / num_stages by head dim (wider tiles need more warps)."""
    if is_interpreter():
        return {}
    return {"num_warps": 4 if max(dk, dv) <= 128 else 8, "num_stages": 2}


def _block_n(select_len: int, dk: int, dv: int) -> int:
    """K/V sub-block of the fwd / dq loop (divides l'): 32 rows for head dims above 128 keeps
    the fwd and dq kernels free of register spills at 8 warps (ptxas, sm_90), else 64."""
    return min(32 if max(dk, dv) > 128 else 64, _pow2(select_len))


def _flat(q, k, v, block_indices, cu_seqlens):
    """Flatten ``[B, T, ...]`` to one packed row and return per-token document starts."""
    B, T, H, _ = q.shape
    cu = batch_cu_seqlens(B, T, q.device) if cu_seqlens is None else cu_seqlens.to(torch.int32)
    qf = q.reshape(B * T, H, q.shape[-1])
    kf = k.reshape(B * T, k.shape[2], k.shape[-1])
    vf = v.reshape(B * T, v.shape[2], v.shape[-1])
    idx = block_indices.reshape(B * T, block_indices.shape[2], block_indices.shape[-1])
    pos = torch.arange(B * T, device=q.device, dtype=torch.int32)
    doc = torch.searchsorted(cu[1:].contiguous(), pos, right=True)
    doc0 = cu[doc.clamp(max=cu.numel() - 2)].contiguous()
    return qf, kf, vf, idx, cu, doc0


def _query_tiles(G: int, cu: torch.Tensor, total: int):
    """Query tiles of the forward / dq grid: ``P`` positions x ``GP`` head rows = 16 rows
    when ``G < 16`` (query packing), one position otherwise. Returns (tiles, constants)."""
    GP = triton.next_power_of_2(G)
    P = max(1, 16 // GP)
    return doc_tiles(cu, total, P), {"G": G, "GP": GP, "P": P}


def _cast_in(*ts):
    """Interpreter: compute bfloat16 in float32 (triton issue 11584)."""
    if is_interpreter():
        return tuple(t.float() if t.dtype == torch.bfloat16 else t for t in ts)
    return ts


def _fwd_impl(q, k, v, block_indices, cu_seqlens, select_len, scale):
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    o = torch.empty(B, T, H, Dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B, T, H, dtype=torch.float32, device=q.device)
    if B * T == 0:
        return o, lse
    qc, kc, vc = _cast_in(q, k, v)
    qf, kf, vf, idx, cu, _ = _flat(qc, kc, vc, block_indices.to(torch.int32), cu_seqlens)
    tiles, tile_consts = _query_tiles(G, cu, B * T)
    same = qc.dtype == q.dtype
    of = o.view(B * T, H, Dv) if same else torch.empty(B * T, H, Dv, dtype=qc.dtype, device=q.device)
    lf = lse.view(B * T, H)
    block_n = _block_n(select_len, Dk, Dv)
    _fwd_kernel[(tiles.shape[0], Hkv)](
        qf, kf, vf, idx, of, lf, tiles, cu,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        idx.stride(0), idx.stride(1), of.stride(0), of.stride(1), lf.stride(0), lf.stride(1),
        scale,
        **tile_consts, DK=Dk, DV=Dv, **_dk_split(Dk), BLOCK_DV=_pow2(Dv), NSEL=idx.shape[-1],
        NP=triton.next_power_of_2(idx.shape[-1]), SEL=select_len, BLOCK_N=block_n, PREC=dot_precision(qf.dtype),
        **_launch_cfg(Dk, Dv),
    )
    if not same:
        o.copy_(of.view(B, T, H, Dv))
    return o, lse


def _inverted_index(idx, cu, doc0, select_len, chunk):
    """Block-to-queries index for the dk/dv kernel (deterministic, no host sync).

    idx ``[T, Hkv, n]`` (flattened tokens). Returns (blocks ``[P, 3]``, tlist ``[E]`` int32:
    query positions grouped by list ``h * P + block`` in ascending ``t``, work ``[W, 4]``:
    (list, entry start, entry end, partial slot or -1 / -2 unused), slots ``[Hkv*P, 2]``:
    (first slot, count) of lists split into chunks, number of slots).
    """
    T, Hkv, n = idx.shape
    blocks = doc_tiles(cu, T, select_len)
    P = blocks.shape[0]
    n_lists = Hkv * P
    cu64 = cu.long()
    lens = cu64[1:] - cu64[:-1]
    ntiles = (lens + select_len - 1) // select_len
    first_blk = torch.cumsum(ntiles, 0) - ntiles
    pos = torch.arange(T, device=idx.device)
    doc = torch.searchsorted(cu64[1:].contiguous(), pos, right=True).clamp(max=lens.numel() - 1)
    t_rel = pos - doc0.long()
    j = idx.long().sort(-1).values  # order inside a row is irrelevant; sorting exposes repeats
    repeat = torch.zeros_like(j, dtype=torch.bool)
    repeat[..., 1:] = j[..., 1:] == j[..., :-1]
    valid = (j >= 0) & (j * select_len <= t_rel[:, None, None]) & ~repeat
    gid = first_blk[doc][:, None, None] + j
    head = torch.arange(Hkv, device=idx.device)[None, :, None]
    key = torch.where(valid, head * P + gid, torch.full_like(gid, n_lists)).flatten()
    sorted_key, perm = torch.sort(key, stable=True)
    tlist = (perm // (Hkv * n)).to(torch.int32)
    offs = torch.searchsorted(sorted_key, torch.arange(n_lists + 1, device=idx.device))
    cnt = offs[1:] - offs[:-1]
    nch = (cnt + chunk - 1) // chunk
    multi = nch > 1
    nslot = torch.where(multi, nch, torch.zeros_like(nch))
    slot_first = torch.cumsum(nslot, 0) - nslot
    lists = torch.arange(n_lists, device=idx.device)
    w0 = torch.stack([lists, offs[:-1], torch.minimum(offs[:-1] + chunk, offs[1:]),
                      torch.where(multi, slot_first, torch.full_like(slot_first, -1))], 1)
    n_extra_max = (T * Hkv * n) // chunk
    n_slots_max = 2 * n_extra_max
    if n_extra_max > 0:
        extra = (nch - 1).clamp(min=0)
        extra_cum = torch.cumsum(extra, 0)
        e = torch.arange(n_extra_max, device=idx.device)
        lst = torch.searchsorted(extra_cum, e, right=True)
        ok = lst < n_lists
        lst_c = lst.clamp(max=n_lists - 1)
        c = e - (extra_cum[lst_c] - extra[lst_c]) + 1
        start = offs[lst_c] + c * chunk
        end = torch.minimum(start + chunk, offs[lst_c + 1])
        slot = torch.where(ok, slot_first[lst_c] + c, torch.full_like(c, -2))
        w1 = torch.stack([lst_c, start, end, slot], 1)
        work = torch.cat([w0, w1], 0)
    else:
        work = w0
    slots = torch.stack([slot_first, nslot], 1)
    return blocks, tlist, work.to(torch.int64).contiguous(), slots.to(torch.int64).contiguous(), n_slots_max


def _bwd_impl(do, q, k, v, o, lse, block_indices, cu_seqlens, select_len, scale):
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    G = H // Hkv
    if B * T == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    qc, kc, vc, dc, oc = _cast_in(q, k, v, do, o)
    qf, kf, vf, idx, cu, doc0 = _flat(qc, kc, vc, block_indices.to(torch.int32), cu_seqlens)
    dof = dc.reshape(B * T, H, Dv)
    lf = lse.reshape(B * T, H)
    delta = (oc.float() * dc.float()).sum(-1).reshape(B * T, H).contiguous()
    prec = dot_precision(qf.dtype)
    cfg = _launch_cfg(Dk, Dv)
    bdv = _pow2(Dv)
    nsel = idx.shape[-1]

    dq = torch.empty(B * T, H, Dk, dtype=qf.dtype, device=q.device)
    tiles, tile_consts = _query_tiles(G, cu, B * T)
    _bwd_dq_kernel[(tiles.shape[0], Hkv)](
        qf, kf, vf, idx, dof, lf, delta, dq, tiles, cu,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        idx.stride(0), idx.stride(1), dof.stride(0), dof.stride(1), lf.stride(0), lf.stride(1),
        dq.stride(0), dq.stride(1),
        scale,
        **tile_consts, DK=Dk, DV=Dv, **_dk_split(Dk), BLOCK_DV=bdv, NSEL=nsel, NP=triton.next_power_of_2(nsel),
        SEL=select_len, BLOCK_N=_block_n(select_len, Dk, Dv), PREC=prec, **cfg,
    )

    GP = triton.next_power_of_2(G)
    # 32 (query, head) rows per step: at Dk = 192 the dk/dv kernel then holds its block's
    # K, V and dk/dv accumulators with (almost) no spills; 64 rows spill ~1.5 KB per thread
    block_t = max(1, 16 // GP) if is_interpreter() else max(1, 32 // GP)
    total = B * T * Hkv * nsel
    # chunk: bounds the serial work of one program and keeps at most ~1024 extra partials
    chunk = max(MIN_CHUNK, -(-total // 1024))
    chunk = -(-chunk // block_t) * block_t
    blocks, tlist, work, slots, n_slots = _inverted_index(idx, cu, doc0, select_len, chunk)
    block_s = _pow2(select_len)
    dk = torch.empty(B * T, Hkv, Dk, dtype=qf.dtype, device=q.device)
    dv = torch.empty(B * T, Hkv, Dv, dtype=qf.dtype, device=q.device)
    pw = _dk_split(Dk)["DK1"] + _dk_split(Dk)["DK2B"]  # partial dk row width
    pdk = torch.empty(max(n_slots, 1), block_s, pw, dtype=torch.float32, device=q.device)
    pdv = torch.empty(max(n_slots, 1), block_s, bdv, dtype=torch.float32, device=q.device)
    n_per_head = blocks.shape[0]
    _bwd_dkdv_kernel[(work.shape[0],)](
        qf, kf, vf, dof, lf, delta, dk, dv, pdk, pdv, work, blocks, tlist,
        qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
        dof.stride(0), dof.stride(1), lf.stride(0), lf.stride(1),
        dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
        scale, n_per_head,
        G=G, GP=GP, BLOCK_T=block_t, DK=Dk, DV=Dv, **_dk_split(Dk), PW=pw, BLOCK_DV=bdv, SEL=select_len,
        BLOCK_S=block_s, PREC=prec, **cfg,
    )
    if n_slots > 0:
        _bwd_reduce_kernel[(Hkv * n_per_head,)](
            dk, dv, pdk, pdv, slots, blocks,
            dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), n_per_head,
            DK=Dk, DV=Dv, BLOCK_DK=_pow2(Dk), PW=pw, BLOCK_DV=bdv, SEL=select_len, BLOCK_S=block_s,
        )
    return (dq.view(B, T, H, Dk).to(q.dtype), dk.view(B, T, Hkv, Dk).to(k.dtype),
            dv.view(B, T, Hkv, Dv).to(v.dtype))


@torch.library.custom_op("nsa::selected_attention", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_indices: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], select_len: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _fwd_impl(q, k, v, block_indices, cu_seqlens, select_len, scale)


@_fwd_op.register_fake
def _(q, k, v, block_indices, cu_seqlens, select_len, scale):
    B, T, H, _ = q.shape
    return q.new_empty(B, T, H, v.shape[-1]), q.new_empty(B, T, H, dtype=torch.float32)


@torch.library.custom_op("nsa::selected_attention_backward", mutates_args=())
def _bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    block_indices: torch.Tensor, cu_seqlens: Optional[torch.Tensor], select_len: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _bwd_impl(do.contiguous(), q, k, v, o, lse, block_indices, cu_seqlens, select_len, scale)


@_bwd_op.register_fake
def _(do, q, k, v, o, lse, block_indices, cu_seqlens, select_len, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, block_indices, cu_seqlens, select_len, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, block_indices, cu_seqlens)
    ctx.select_len, ctx.scale = select_len, scale


def _backward(ctx, do, dlse):
    q, k, v, o, lse, block_indices, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _bwd_op(do, q, k, v, o, lse, block_indices, cu_seqlens, ctx.select_len, ctx.scale)
    return dq, dk, dv, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    select_len: int,
    scale: Optional[float] = None,
    cu_seqlens: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Attention of every head of a group over its selected blocks: ``[B, T, H, Dv]``.

    q ``[B, T, H, Dk]``, k ``[B, T, Hkv, Dk]``, v ``[B, T, Hkv, Dv]``, block_indices
    ``[B, T, Hkv, n]`` int (document-relative, ``-1`` = none), causal inside the block
    holding ``t``; a query with no valid token gets 0. Differentiable in q, k, v.
    """
    if scale is None:
        scale = q.shape[-1] ** -0.5
    o, _ = _fwd_op(q.contiguous(), k.contiguous(), v.contiguous(), block_indices.contiguous(),
                   cu_seqlens, select_len, float(scale))
    return o
