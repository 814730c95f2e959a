"""Triton compressed attention (NSA branch 1), forward and backward.

The kernels here are written once for a *banded* attention that covers both the
compressed branch and the sliding window (``nsa.ops.sliding_window_attention.triton``
reuses them): key ``j`` of a document sits at position ``e_j = j*stride + block_len - 1``
(the last token of its block) and query ``t`` sees it iff ``t - window < e_j <= t``.
Compressed attention is ``window = inf``; the sliding window is ``stride = block_len = 1``.

Tiling (GQA packing): for one KV head, the ``T*G`` query rows of its ``G`` heads are
flattened as ``row = t*G + g`` and cut into tiles of ``BLOCK_M`` rows, so every tile
fills the MMA whatever ``G`` is (1 ... 16 and above) and each K/V tile is loaded once
for all heads of the group. Every loop runs only over the key (or query) tiles that
the band reaches; tiles fully inside the band skip the mask.

A head dim that is not a power of two is read as two column tiles (Dk = 192 as 128 + 64)
rather than padded. Backward is split (no atomics): one kernel per query tile computes
``dq``; one per key tile loops over the query rows that see it and computes ``dk, dv``,
with those rows cut over several programs when they are many (the compressed branch),
whose float32 partial sums are then added in a fixed order (deterministic).
"""

import contextlib
import os
from typing import Optional

import torch
import triton
import triton.language as tl

from nsa.ops.triton_utils import (
    batch_cu_seqlens,
    compressed_cu_seqlens,
    dot_precision,
    interpreter_upcast,
    is_interpreter,
    max_seqlen,
    next_pow2,
    select_configs,
)

LOG2E = 1.4426950408889634
NO_WINDOW = 1 << 30  # "window = inf": larger than any sequence


def _cfg(bm: int, bn: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=warps, num_stages=stages)


# Hopper-sized tiles. By default each kernel runs one config chosen from the head dims
# (no autotuning: it costs seconds of compiling per new shape); NSA_TRITON_AUTOTUNE=1
# benchmarks all of them instead. dkv tiles are (BLOCK_M query rows, BLOCK_N keys).
_FWD_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(128, 64, 8, 3), _cfg(64, 64, 4, 2)]
_DQ_CONFIGS = [_cfg(128, 64, 8, 2), _cfg(64, 64, 4, 2), _cfg(64, 32, 4, 3)]
_DKV_CONFIGS = [_cfg(64, 64, 4, 2), _cfg(64, 64, 8, 2), _cfg(64, 32, 4, 2), _cfg(32, 64, 8, 2), _cfg(32, 128, 8, 2)]
_INTERP_CONFIG = _cfg(32, 16, 4, 1)
_KEY = ["G", "DK", "DV", "PREC", "BLOCK_LEN", "STRIDE"]  # compressed and window tune apart


@triton.jit
def _doc(CU_Q, CU_K, pid_h, HKV):
    """KV head and query / key extents of the document of program row ``pid_h``."""
    doc = pid_h // HKV
    q_start = tl.load(CU_Q + doc)
    k_start = tl.load(CU_K + doc)
    return pid_h % HKV, q_start, tl.load(CU_Q + doc + 1) - q_start, k_start, tl.load(CU_K + doc + 1) - k_start


@triton.jit
def _band(t_first, t_last, k_len, BLOCK_LEN, STRIDE, WINDOW, BLOCK_N: tl.constexpr):
    """Key ranges of the query rows ``t_first..t_last``: ``[a, d)`` is what any row sees,
    cut as ``[a, b)`` masked, ``[b, c)`` seen by every row (no mask), ``[c, d)`` masked;
    ``b - a`` and ``c - b`` are multiples of ``BLOCK_N``."""
    x_first = t_first - WINDOW - BLOCK_LEN + 1
    x_last = t_last - WINDOW - BLOCK_LEN + 1
    a = tl.where(x_first >= 0, x_first // STRIDE + 1, 0)
    full_lo = tl.where(x_last >= 0, x_last // STRIDE + 1, 0)
    d = tl.where(t_last + 1 >= BLOCK_LEN, (t_last + 1 - BLOCK_LEN) // STRIDE + 1, 0)
    full_hi = tl.where(t_first + 1 >= BLOCK_LEN, (t_first + 1 - BLOCK_LEN) // STRIDE + 1, 0)
    d = tl.minimum(d, k_len)
    full_hi = tl.minimum(full_hi, k_len)
    a = tl.minimum(a, d)
    b = tl.minimum(tl.maximum(full_lo, a), d)
    b = tl.minimum(a + tl.cdiv(b - a, BLOCK_N) * BLOCK_N, d)
    c = tl.minimum(tl.maximum(full_hi, b), d)
    c = b + ((c - b) // BLOCK_N) * BLOCK_N
    return a, b, c, d


@triton.jit
def _rows(band_a, band_b, band_c, band_d, n_rows, G: tl.constexpr, BLOCK_M: tl.constexpr):
    """Same cut for the query rows ``row = t*G + g`` of the positions band ``[a, d)``
    (``[b, c)`` = positions that see every key of the tile)."""
    a = tl.minimum(band_a * G, n_rows)
    d = tl.minimum(band_d * G, n_rows)
    b = tl.minimum(tl.maximum(band_b * G, a), d)
    b = tl.minimum(a + tl.cdiv(b - a, BLOCK_M) * BLOCK_M, d)
    c = tl.minimum(tl.maximum(tl.minimum(band_c * G, n_rows), b), d)
    c = b + ((c - b) // BLOCK_M) * BLOCK_M
    return a, b, c, d


@triton.jit
def _visible(t, j, k_len, BLOCK_LEN, STRIDE, WINDOW):
    """``[len(t), len(j)]`` mask: query position ``t`` sees key ``j``."""
    e = j * STRIDE + BLOCK_LEN - 1
    return (e[None, :] <= t[:, None]) & (e[None, :] > t[:, None] - WINDOW) & (j[None, :] < k_len)


@triton.jit
def _load_cols(rows_ptr, rows_ok, offs_a, offs_b, D: tl.constexpr, SPLIT: tl.constexpr):
    """Load ``[M, D]`` (one row pointer each) as column parts ``a`` and, if SPLIT, ``b``
    (``D = 192`` is read as 128 + 64 columns instead of being padded to 256)."""
    xa = tl.load(rows_ptr[:, None] + offs_a[None, :], mask=rows_ok[:, None] & (offs_a[None, :] < D), other=0.0)
    if SPLIT:
        xb = tl.load(rows_ptr[:, None] + offs_b[None, :], mask=rows_ok[:, None] & (offs_b[None, :] < D),
                     other=0.0)
    else:
        xb = xa  # unused
    return xa, xb


@triton.jit
def _store_cols(rows_ptr, rows_ok, xa, xb, offs_a, offs_b, D: tl.constexpr, SPLIT: tl.constexpr):
    tl.store(rows_ptr[:, None] + offs_a[None, :], xa, mask=rows_ok[:, None] & (offs_a[None, :] < D))
    if SPLIT:
        tl.store(rows_ptr[:, None] + offs_b[None, :], xb, mask=rows_ok[:, None] & (offs_b[None, :] < D))


@triton.jit
def _scores(xa, xb, ya, yb, PREC: tl.constexpr, SPLIT: tl.constexpr):
    """``x @ y^T`` over the (possibly split) head dim."""
    s = tl.dot(xa, tl.trans(ya), input_precision=PREC)
    if SPLIT:
        s += tl.dot(xb, tl.trans(yb), input_precision=PREC)
    return s


@triton.jit
def _load_kv_tile(K, V, k_base, v_base, stride_kt, stride_vt, start, k_len, offs_n, offs_da, offs_db, offs_dv,
                  DK: tl.constexpr, DV: tl.constexpr, SPLIT: tl.constexpr):
    """Key rows ``start + offs_n`` (K in one or two column tiles) and their values; rows past
    ``k_len`` read as 0. Shared by the forward and dq tiles."""
    j = start + offs_n
    j_ok = j < k_len
    ka, kb = _load_cols(K + k_base + j.to(tl.int64) * stride_kt, j_ok, offs_da, offs_db, DK, SPLIT)
    v = tl.load(V + v_base + j.to(tl.int64)[:, None] * stride_vt + offs_dv[None, :],
                mask=j_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    return j, ka, kb, v


@triton.jit
def _fwd_tile(acc, m_i, l_i, qa, qb, t, K, V, k_base, v_base, stride_kt, stride_vt, start, k_len,
              scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db, offs_dv,
              DK: tl.constexpr, DV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """One key tile of the online softmax (log2 domain)."""
    j, ka, kb, v = _load_kv_tile(K, V, k_base, v_base, stride_kt, stride_vt, start, k_len,
                                 offs_n, offs_da, offs_db, offs_dv, DK, DV, SPLIT)
    s = _scores(qa, qb, ka, kb, PREC, SPLIT) * scale_log2
    if MASK:
        s = tl.where(_visible(t, j, k_len, BLOCK_LEN, STRIDE, WINDOW), s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
    return acc, m_new, l_i


@triton.jit
def _fwd_kernel(Q, K, V, O, LSE, CU_Q, CU_K, scale_log2, HKV,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_ot, stride_oh,
                BLOCK_LEN, STRIDE, WINDOW,
                G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
                BLOCK_DB: tl.constexpr, SPLIT: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # longest rows (causal) first
    pid_h = tl.program_id(1)
    kvh, q_start, q_len, k_start, k_len = _doc(CU_Q, CU_K, pid_h, HKV)
    if pid_m * BLOCK_M >= q_len * G:
        return
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t = rows // G
    head = kvh * G + rows % G
    row_ok = t < q_len
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, BLOCK_DA)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_row = (q_start + t).to(tl.int64)
    qa, qb = _load_cols(Q + q_row * stride_qt + head * stride_qh, row_ok, offs_da, offs_db, DK, SPLIT)
    k_base = k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = k_start.to(tl.int64) * stride_vt + kvh * stride_vh

    t_first = (pid_m * BLOCK_M) // G
    t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    a, b, c, d = _band(t_first, t_last, k_len, BLOCK_LEN, STRIDE, WINDOW, BLOCK_N)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(a, b, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qa, qb, t, K, V, k_base, v_base, stride_kt, stride_vt, start,
                                  k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                                  offs_dv, DK, DV, SPLIT, PREC, True)
    for start in range(b, c, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qa, qb, t, K, V, k_base, v_base, stride_kt, stride_vt, start,
                                  k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                                  offs_dv, DK, DV, SPLIT, PREC, False)
    for start in range(c, d, BLOCK_N):
        acc, m_i, l_i = _fwd_tile(acc, m_i, l_i, qa, qb, t, K, V, k_base, v_base, stride_kt, stride_vt, start,
                                  k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                                  offs_dv, DK, DV, SPLIT, PREC, True)
    empty = l_i == 0.0
    o = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) / 1.4426950408889634)
    tl.store(O + q_row[:, None] * stride_ot + head[:, None] * stride_oh + offs_dv[None, :],
             o.to(O.dtype.element_ty), mask=row_ok[:, None] & (offs_dv[None, :] < DV))
    tl.store(LSE + q_row * (HKV * G) + head, lse, mask=row_ok)


@triton.jit
def _load_rows(Q, DO, LSE, DELTA, rows, q_start, q_len, kvh, stride_qt, stride_qh, stride_dot, stride_doh,
               HKV, offs_da, offs_db, offs_dv, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
               SPLIT: tl.constexpr, REL_ADDR: tl.constexpr):
    """Load q ``[M, DK]`` (parts a, b), do ``[M, DV]``, lse (log2 units; +inf where nothing
    is visible, so that p = 0) and delta for query rows ``row = t*G + g``.

    REL_ADDR: int64 only in the tile's scalar base and small int32 per-row offsets, which
    frees registers in the dk/dv loop (fewer spills at Dk 192 / Dv 128 on sm_90)."""
    t = rows // G
    g = rows % G
    head = kvh * G + g
    row_ok = t < q_len
    q_row = (q_start + t).to(tl.int64)
    if REL_ADDR:
        t0 = tl.min(t, 0)
        base = (q_start + t0).to(tl.int64)
        dt = t - t0
        q_rows = Q + (base * stride_qt + kvh * G * stride_qh) + (dt * stride_qt + g * stride_qh)
        do_rows = DO + (base * stride_dot + kvh * G * stride_doh) + (dt * stride_dot + g * stride_doh)
        l_rows = (base * (HKV * G) + kvh * G) + (dt * (HKV * G) + g)
    else:
        q_rows = Q + q_row * stride_qt + head * stride_qh
        do_rows = DO + q_row * stride_dot + head * stride_doh
        l_rows = q_row * (HKV * G) + head
    qa, qb = _load_cols(q_rows, row_ok, offs_da, offs_db, DK, SPLIT)
    do = tl.load(do_rows[:, None] + offs_dv[None, :], mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + l_rows, mask=row_ok, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(DELTA + l_rows, mask=row_ok, other=0.0)
    return t, q_row, head, row_ok, qa, qb, do, lse, delta


@triton.jit
def _dq_tile(dqa, dqb, qa, qb, do, lse, delta, t, K, V, k_base, v_base, stride_kt, stride_vt, start, k_len,
             scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db, offs_dv,
             DK: tl.constexpr, DV: tl.constexpr, SPLIT: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    j, ka, kb, v = _load_kv_tile(K, V, k_base, v_base, stride_kt, stride_vt, start, k_len,
                                 offs_n, offs_da, offs_db, offs_dv, DK, DV, SPLIT)
    p = tl.exp2(_scores(qa, qb, ka, kb, PREC, SPLIT) * scale_log2 - lse[:, None])
    if MASK:
        p = tl.where(_visible(t, j, k_len, BLOCK_LEN, STRIDE, WINDOW), p, 0.0)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = (p * (dp - delta[:, None])).to(ka.dtype)
    dqa += tl.dot(ds, ka, input_precision=PREC)
    if SPLIT:
        dqb += tl.dot(ds, kb, input_precision=PREC)
    return dqa, dqb


@triton.jit
def _dq_kernel(Q, K, V, DO, LSE, DELTA, DQ, CU_Q, CU_K, scale, scale_log2, HKV,
               stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
               stride_dqt, stride_dqh, BLOCK_LEN, STRIDE, WINDOW,
               G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
               BLOCK_DB: tl.constexpr, SPLIT: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_h = tl.program_id(1)
    kvh, q_start, q_len, k_start, k_len = _doc(CU_Q, CU_K, pid_h, HKV)
    if pid_m * BLOCK_M >= q_len * G:
        return
    offs_n = tl.arange(0, BLOCK_N)
    offs_da = tl.arange(0, BLOCK_DA)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    offs_dv = tl.arange(0, BLOCK_DV)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    t, q_row, head, row_ok, qa, qb, do, lse, delta = _load_rows(
        Q, DO, LSE, DELTA, rows, q_start, q_len, kvh, stride_qt, stride_qh, stride_dot, stride_doh,
        HKV, offs_da, offs_db, offs_dv, G, DK, DV, SPLIT, False)
    k_base = k_start.to(tl.int64) * stride_kt + kvh * stride_kh
    v_base = k_start.to(tl.int64) * stride_vt + kvh * stride_vh

    t_first = (pid_m * BLOCK_M) // G
    t_last = tl.minimum((pid_m * BLOCK_M + BLOCK_M - 1) // G, q_len - 1)
    a, b, c, d = _band(t_first, t_last, k_len, BLOCK_LEN, STRIDE, WINDOW, BLOCK_N)
    dqa = tl.zeros([BLOCK_M, BLOCK_DA], tl.float32)
    dqb = tl.zeros([BLOCK_M, BLOCK_DB], tl.float32)
    for start in range(a, b, BLOCK_N):
        dqa, dqb = _dq_tile(dqa, dqb, qa, qb, do, lse, delta, t, K, V, k_base, v_base, stride_kt, stride_vt,
                            start, k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                            offs_dv, DK, DV, SPLIT, PREC, True)
    for start in range(b, c, BLOCK_N):
        dqa, dqb = _dq_tile(dqa, dqb, qa, qb, do, lse, delta, t, K, V, k_base, v_base, stride_kt, stride_vt,
                            start, k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                            offs_dv, DK, DV, SPLIT, PREC, False)
    for start in range(c, d, BLOCK_N):
        dqa, dqb = _dq_tile(dqa, dqb, qa, qb, do, lse, delta, t, K, V, k_base, v_base, stride_kt, stride_vt,
                            start, k_len, scale_log2, BLOCK_LEN, STRIDE, WINDOW, offs_n, offs_da, offs_db,
                            offs_dv, DK, DV, SPLIT, PREC, True)
    dty = DQ.dtype.element_ty
    _store_cols(DQ + q_row * stride_dqt + head * stride_dqh, row_ok, (dqa * scale).to(dty), (dqb * scale).to(dty),
                offs_da, offs_db, DK, SPLIT)


@triton.jit
def _dkv_tile(dka, dkb, dv, ka, kb, v, j, k_len, Q, DO, LSE, DELTA, start, q_start, q_len, kvh,
              stride_qt, stride_qh, stride_dot, stride_doh, HKV, scale_log2, BLOCK_LEN, STRIDE, WINDOW,
              offs_m, offs_da, offs_db, offs_dv, G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr,
              SPLIT: tl.constexpr, PREC: tl.constexpr, MASK: tl.constexpr):
    """Accumulate one tile of query rows into the key tile's dk, dv (transposed scores)."""
    t, q_row, head, row_ok, qa, qb, do, lse, delta = _load_rows(
        Q, DO, LSE, DELTA, start + offs_m, q_start, q_len, kvh, stride_qt, stride_qh, stride_dot, stride_doh,
        HKV, offs_da, offs_db, offs_dv, G, DK, DV, SPLIT, True)
    pT = tl.exp2(_scores(ka, kb, qa, qb, PREC, SPLIT) * scale_log2 - lse[None, :])
    if MASK:
        pT = tl.where(tl.trans(_visible(t, j, k_len, BLOCK_LEN, STRIDE, WINDOW)), pT, 0.0)
    dv += tl.dot(pT.to(do.dtype), do, input_precision=PREC)
    dpT = tl.dot(v, tl.trans(do), input_precision=PREC)
    dsT = (pT * (dpT - delta[None, :])).to(qa.dtype)
    dka += tl.dot(dsT, qa, input_precision=PREC)
    if SPLIT:
        dkb += tl.dot(dsT, qb, input_precision=PREC)
    return dka, dkb, dv


@triton.jit
def _dkv_kernel(Q, K, V, DO, LSE, DELTA, DK_OUT, DV_OUT, CU_Q, CU_K, scale, scale_log2, HKV,
                stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
                stride_dkt, stride_dkh, stride_dvt, stride_dvh, BLOCK_LEN, STRIDE, WINDOW,
                ROW_CHUNK, stride_dkr, stride_dvr,
                G: tl.constexpr, DK: tl.constexpr, DV: tl.constexpr, BLOCK_DA: tl.constexpr,
                BLOCK_DB: tl.constexpr, SPLIT: tl.constexpr, BLOCK_DV: tl.constexpr, PREC: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_h = tl.program_id(1)
    kvh, q_start, q_len, k_start, k_len = _doc(CU_Q, CU_K, pid_h, HKV)
    if pid_n * BLOCK_N >= k_len:
        return
    offs_m = tl.arange(0, BLOCK_M)
    offs_da = tl.arange(0, BLOCK_DA)
    offs_db = BLOCK_DA + tl.arange(0, BLOCK_DB)
    offs_dv = tl.arange(0, BLOCK_DV)
    # positions that see the first / last key of the tile: [e_first, e_last + WINDOW)
    e_first = pid_n * BLOCK_N * STRIDE + BLOCK_LEN - 1
    e_last = tl.minimum(pid_n * BLOCK_N + BLOCK_N - 1, k_len - 1) * STRIDE + BLOCK_LEN - 1
    t_a = tl.minimum(e_first, q_len)
    t_d = tl.minimum(e_last + WINDOW, q_len)
    t_b = tl.minimum(e_last, t_d)
    t_c = tl.minimum(e_first + WINDOW, q_len)
    a, b, c, d = _rows(t_a, t_b, t_c, t_d, q_len * G, G, BLOCK_M)
    # this program's chunk of those rows (grid axis 2; outputs are zero-initialised)
    lo = a + tl.program_id(2) * ROW_CHUNK
    if lo >= d:
        return
    hi = lo + ROW_CHUNK

    j = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    j_ok = j < k_len
    k_row = (k_start + j).to(tl.int64)
    ka, kb = _load_cols(K + k_row * stride_kt + kvh * stride_kh, j_ok, offs_da, offs_db, DK, SPLIT)
    v = tl.load(V + k_row[:, None] * stride_vt + kvh * stride_vh + offs_dv[None, :],
                mask=j_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dka = tl.zeros([BLOCK_N, BLOCK_DA], tl.float32)
    dkb = tl.zeros([BLOCK_N, BLOCK_DB], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(tl.maximum(a, lo), tl.minimum(b, hi), BLOCK_M):
        dka, dkb, dv = _dkv_tile(dka, dkb, dv, ka, kb, v, j, k_len, Q, DO, LSE, DELTA, start, q_start, q_len,
                                 kvh, stride_qt, stride_qh, stride_dot, stride_doh, HKV, scale_log2, BLOCK_LEN,
                                 STRIDE, WINDOW, offs_m, offs_da, offs_db, offs_dv, G, DK, DV, SPLIT, PREC, True)
    for start in range(tl.maximum(b, lo), tl.minimum(c, hi), BLOCK_M):
        dka, dkb, dv = _dkv_tile(dka, dkb, dv, ka, kb, v, j, k_len, Q, DO, LSE, DELTA, start, q_start, q_len,
                                 kvh, stride_qt, stride_qh, stride_dot, stride_doh, HKV, scale_log2, BLOCK_LEN,
                                 STRIDE, WINDOW, offs_m, offs_da, offs_db, offs_dv, G, DK, DV, SPLIT, PREC, False)
    for start in range(tl.maximum(c, lo), tl.minimum(d, hi), BLOCK_M):
        dka, dkb, dv = _dkv_tile(dka, dkb, dv, ka, kb, v, j, k_len, Q, DO, LSE, DELTA, start, q_start, q_len,
                                 kvh, stride_qt, stride_qh, stride_dot, stride_doh, HKV, scale_log2, BLOCK_LEN,
                                 STRIDE, WINDOW, offs_m, offs_da, offs_db, offs_dv, G, DK, DV, SPLIT, PREC, True)
    dty = DK_OUT.dtype.element_ty
    r = tl.program_id(2).to(tl.int64)
    _store_cols(DK_OUT + r * stride_dkr + k_row * stride_dkt + kvh * stride_dkh, j_ok, (dka * scale).to(dty),
                (dkb * scale).to(dty), offs_da, offs_db, DK, SPLIT)
    tl.store(DV_OUT + r * stride_dvr + k_row[:, None] * stride_dvt + kvh * stride_dvh + offs_dv[None, :],
             dv.to(DV_OUT.dtype.element_ty), mask=j_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _delta_kernel(O, DO, DLSE, DELTA, n_rows, DV: tl.constexpr, BLOCK_DV: tl.constexpr, HAS_DLSE: tl.constexpr,
                  BLOCK_R: tl.constexpr):
    """``delta = rowsum(o * do) (- dlse)`` in float32 over contiguous ``[rows, DV]`` o and do."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    ok = rows < n_rows
    cols = tl.arange(0, BLOCK_DV)
    offs = rows.to(tl.int64)[:, None] * DV + cols[None, :]
    mask = ok[:, None] & (cols[None, :] < DV)
    o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + offs, mask=mask, other=0.0).to(tl.float32)
    delta = tl.sum(o * do, 1)
    if HAS_DLSE:
        delta -= tl.load(DLSE + rows, mask=ok, other=0.0)
    tl.store(DELTA + rows, delta, mask=ok)


# ----------------------------------------------------------------------------- launchers


def _default_config(kind: str, meta: dict) -> triton.Config:
    """Heuristic tile config per kernel and head dims (wide heads: fewer rows per tile)."""
    if is_interpreter():
        return _INTERP_CONFIG
    wide = meta["BLOCK_DA"] + meta["BLOCK_DB"] * meta["SPLIT"] + meta["BLOCK_DV"] > 256
    # wide: the autotuner's choice on an H200 for Dk 192 / Dv 128 (bf16, G 16, both branches)
    return {
        "fwd": _cfg(64, 64, 4, 2) if wide else _cfg(128, 64, 8, 3),
        "dq": _cfg(128, 64, 8, 2),
        "dkv": _cfg(64, 32, 4, 2) if wide else _cfg(64, 64, 4, 2),
    }[kind]


def _launch(kind: str, grid, *args, **meta) -> None:
    """Run kernel ``kind`` with the heuristic config, or autotuned with NSA_TRITON_AUTOTUNE=1."""
    if os.environ.get("NSA_TRITON_AUTOTUNE", "0") == "1" and not is_interpreter():
        _TUNED[kind][grid](*args, **meta)
        return
    cfg = _default_config(kind, meta)
    _KERNELS[kind][lambda m: grid({**m, **cfg.kwargs})](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps,
                                                        num_stages=cfg.num_stages)


_KERNELS = {"fwd": _fwd_kernel, "dq": _dq_kernel, "dkv": _dkv_kernel}
_TUNED = {
    kind: triton.autotune(configs=select_configs(configs, _INTERP_CONFIG), key=_KEY)(_KERNELS[kind])
    for kind, configs in (("fwd", _FWD_CONFIGS), ("dq", _DQ_CONFIGS), ("dkv", _DKV_CONFIGS))
}


def _on_device(x: torch.Tensor):
    """Launch on ``x``'s GPU (Triton uses the current CUDA device)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()


def _flat(x: torch.Tensor) -> torch.Tensor:
    """``[B, T, H, D]`` -> contiguous ``[B*T, H, D]``."""
    return x.contiguous().reshape(-1, x.shape[-2], x.shape[-1])


def _split_dim(d: int) -> tuple[int, int, bool]:
    """Head dim ``d`` as column tiles ``(a, b, split)``: a power of two plus, when ``d`` is not
    one, a second power-of-two tile for the rest (192 -> 128 + 64 instead of 256)."""
    a = max(16, 1 << (int(d).bit_length() - 1))
    if a >= d:
        return next_pow2(d), 16, False
    return a, next_pow2(d - a), True


def _meta(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> dict:
    hkv = k.shape[-2]
    da, db, split = _split_dim(q.shape[-1])
    return dict(G=q.shape[-2] // hkv, DK=q.shape[-1], DV=v.shape[-1], BLOCK_DA=da, BLOCK_DB=db, SPLIT=split,
                BLOCK_DV=next_pow2(v.shape[-1]), PREC=dot_precision(q.dtype))


def band_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, block_len, stride, window, scale):
    """Banded attention forward (see module docstring).

    q ``[B, T, H, Dk]``, k ``[B, Tk, Hkv, Dk]``, v ``[B, Tk, Hkv, Dv]``; documents given by
    ``cu_q``/``cu_k`` (int32 ``[N+1]``) over the flattened ``B*T`` / ``B*Tk`` rows.
    Returns o ``[B, T, H, Dv]`` (q's dtype) and lse ``[B, T, H]`` float32 (natural log;
    ``-inf`` and o = 0 where a query sees no key).
    """
    B, T, H, _ = q.shape
    hkv, dv = k.shape[-2], v.shape[-1]
    qf, kf, vf = _flat(q), _flat(k), _flat(v)
    o = torch.empty(B * T, H, dv, dtype=q.dtype, device=q.device)
    lse = torch.empty(B * T, H, dtype=torch.float32, device=q.device)
    meta = _meta(q, k, v)
    n_docs = cu_q.numel() - 1
    grid = lambda m: (triton.cdiv(max_q * meta["G"], m["BLOCK_M"]), n_docs * hkv)
    if max_q > 0 and n_docs > 0:
        with _on_device(q):
            _launch("fwd", grid, qf, kf, vf, o, lse, cu_q, cu_k, scale * LOG2E, hkv,
                    qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1), vf.stride(0), vf.stride(1),
                    o.stride(0), o.stride(1), block_len, stride, window, **meta)
    return o.view(B, T, H, dv), lse.view(B, T, H)


DKV_SPLIT_ROWS = 16384  # dk/dv: query rows per program before the rows are split across programs
DKV_MAX_SPLITS = 16


def _dkv_row_chunks(max_q: int, G: int, block_len: int, stride: int, window: int) -> tuple[int, int]:
    """``(splits, rows per split)`` for the dk/dv kernel.

    A key tile is seen by up to ``span`` query rows: all later ones for the compressed
    branch (few key tiles, long loops), ``~(128*stride + window) * G`` for the window.
    Long spans are cut into ``splits`` chunks run by separate programs, whose partial
    sums go to float32 buffers that are summed afterwards (deterministic, no atomics).
    Chunks are multiples of 128 rows, so they align with every ``BLOCK_M``.
    """
    span = min(max_q, 128 * stride + window + block_len) * G
    if span <= DKV_SPLIT_ROWS:
        return 1, triton.cdiv(max(span, 1), 128) * 128
    splits = min(DKV_MAX_SPLITS, triton.cdiv(span, DKV_SPLIT_ROWS))
    return splits, triton.cdiv(triton.cdiv(span, splits), 128) * 128


def band_attention_backward(do, q, k, v, o, lse, dlse, cu_q, cu_k, max_q, max_k, block_len, stride, window,
                            scale):
    """Gradients (dq, dk, dv) of :func:`band_attention_forward`; ``dlse`` may be None.

    ``delta = rowsum(o * do) - dlse`` folds the gradient of lse in (d lse / d s = p).
    """
    B, T, H, _ = q.shape
    hkv, dv_dim = k.shape[-2], v.shape[-1]
    qf, kf, vf, dof = _flat(q), _flat(k), _flat(v), _flat(do)
    meta = _meta(q, k, v)
    n_docs = cu_q.numel() - 1
    delta = torch.empty(B * T, H, dtype=torch.float32, device=q.device)
    dq = torch.empty_like(qf) if max_q > 0 and n_docs > 0 else torch.zeros_like(qf)  # kernel writes every row
    dk = torch.zeros_like(kf)  # rows outside every document (if any) get 0
    dv = torch.zeros_like(vf)
    if B * T * H == 0:
        return dq.view_as(q), dk.view_as(k), dv.view_as(v)
    common = (scale, scale * LOG2E, hkv, qf.stride(0), qf.stride(1), kf.stride(0), kf.stride(1),
              vf.stride(0), vf.stride(1), dof.stride(0), dof.stride(1))
    with _on_device(q):
        dlse_f = delta if dlse is None else dlse.float().contiguous()
        _delta_kernel[(triton.cdiv(B * T * H, 64),)](o.contiguous(), dof, dlse_f, delta, B * T * H, DV=dv_dim,
                                                     BLOCK_DV=meta["BLOCK_DV"], HAS_DLSE=dlse is not None,
                                                     BLOCK_R=64)
        if max_q > 0 and n_docs > 0:
            grid_q = lambda m: (triton.cdiv(max_q * meta["G"], m["BLOCK_M"]), n_docs * hkv)
            _launch("dq", grid_q, qf, kf, vf, dof, lse.contiguous(), delta, dq, cu_q, cu_k, *common,
                    dq.stride(0), dq.stride(1), block_len, stride, window, **meta)
        if max_k > 0 and n_docs > 0:
            splits, chunk = _dkv_row_chunks(max_q, meta["G"], block_len, stride, window)
            dk_out, dv_out = (dk, dv) if splits == 1 else (
                torch.zeros(splits, *kf.shape, dtype=torch.float32, device=q.device),
                torch.zeros(splits, *vf.shape, dtype=torch.float32, device=q.device))
            grid_k = lambda m: (triton.cdiv(max_k, m["BLOCK_N"]), n_docs * hkv, splits)
            _launch("dkv", grid_k, qf, kf, vf, dof, lse.contiguous(), delta, dk_out, dv_out, cu_q, cu_k, *common,
                    dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1), block_len, stride, window,
                    chunk, dk_out.stride(0) if splits > 1 else 0, dv_out.stride(0) if splits > 1 else 0, **meta)
            if splits > 1:  # deterministic reduction of the per-chunk partial sums
                dk = dk_out.sum(0).to(k.dtype)
                dv = dv_out.sum(0).to(v.dtype)
    return dq.view_as(q), dk.view_as(k), dv.view_as(v)


# ----------------------------------------------------------------------------- op


def _docs(q, k, cu_seqlens, block_len, stride):
    """``(cu_q, cu_k, max_q, max_k)`` for q and the compressed keys (packed per document)."""
    if cu_seqlens is None:
        B, T = q.shape[:2]
        return (batch_cu_seqlens(B, T, q.device), batch_cu_seqlens(B, k.shape[1], q.device), T, k.shape[1])
    cu_q = cu_seqlens.to(device=q.device, dtype=torch.int32)
    cu_k = compressed_cu_seqlens(cu_q, block_len, stride)
    return cu_q, cu_k, max_seqlen(cu_q), max_seqlen(cu_k)


@torch.library.custom_op("nsa::compressed_attention", mutates_args=())
def _compressed_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                             block_len: int, stride: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    q, k, v = interpreter_upcast(q, k, v)
    cu_q, cu_k, max_q, max_k = _docs(q, k, cu_seqlens, block_len, stride)
    o, lse = band_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, block_len, stride, NO_WINDOW, scale)
    return o.to(dtype), lse


@_compressed_attention_op.register_fake
def _(q, k, v, cu_seqlens, block_len, stride, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("nsa::compressed_attention_backward", mutates_args=())
def _compressed_attention_bwd_op(do: torch.Tensor, dlse: Optional[torch.Tensor], q: torch.Tensor, k: torch.Tensor,
                                 v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                                 cu_seqlens: Optional[torch.Tensor], block_len: int, stride: int,
                                 scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtypes = (q.dtype, k.dtype, v.dtype)
    do, q, k, v, o = interpreter_upcast(do, q, k, v, o)
    cu_q, cu_k, max_q, max_k = _docs(q, k, cu_seqlens, block_len, stride)
    grads = band_attention_backward(do, q, k, v, o, lse, dlse, cu_q, cu_k, max_q, max_k, block_len, stride,
                                    NO_WINDOW, scale)
    return tuple(g.to(dt) for g, dt in zip(grads, dtypes, strict=True))


@_compressed_attention_bwd_op.register_fake
def _(do, dlse, q, k, v, o, lse, cu_seqlens, block_len, stride, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, block_len, stride, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.args = (block_len, stride, scale)


def _backward(ctx, do, dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _compressed_attention_bwd_op(do.contiguous(), dlse, q, k, v, o, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None, None


_compressed_attention_op.register_autograd(_backward, setup_context=_setup)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale=None, cu_seqlens=None):
    """Causal attention of q over the compressed keys: query ``t`` sees block ``i`` iff
    ``i*stride + block_len - 1 <= t``.

    q ``[B, T, H, Dk]``, k_cmp ``[B, Tc, Hkv, Dk]``, v_cmp ``[B, Tc, Hkv, Dv]`` (with
    ``cu_seqlens``, ``B == 1`` and the compressed rows are packed per document at offsets
    ``compressed_cu_seqlens``). Returns o ``[B, T, H, Dv]`` and lse ``[B, T, H]`` float32;
    o = 0 and lse = -inf for queries that see no block. Differentiable in q, k_cmp, v_cmp.
    """
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _compressed_attention_op(q, k_cmp, v_cmp, cu_seqlens, int(block_len), int(stride), scale)


__all__ = ["compressed_attention", "band_attention_forward", "band_attention_backward", "NO_WINDOW"]
