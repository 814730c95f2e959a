"""PyTorch reference for the compressed branch.

Compressed block ``i`` covers tokens ``[i*d, i*d + l)`` and is visible to query ``t`` iff
``i*d + l - 1 <= t`` (NSA_SPEC.md). Method: flash-attention-style chunks over queries
(:class:`nsa.ops.chunked.ChunkedAttention`). A chunk ``[q0, q1)`` scores its queries only
against the blocks visible to its last query, masks the rest per token, and keeps ``o`` and
``lse``; backward recomputes the chunk's probabilities from ``lse``. Nothing of size
``[T, Nc]`` is ever held, so memory is linear in ``T``. Queries that see no block get
``o = 0`` and ``lse = -inf`` (and zero gradients).
"""

from __future__ import annotations

import torch

from nsa.ops.chunked import chunked_attention
from nsa.ops.common import (
    chunk_size,
    compressed_cu_seqlens,
    num_compressed,
    per_document,
    resolve_scale,
)


def visible_blocks(t_last: int, block_len: int, stride: int) -> int:
    """How many compressed blocks query ``t_last`` sees: ``floor((t - l + 1)/d) + 1`` or 0."""
    return num_compressed(t_last + 1, block_len, stride)


def compressed_plan(T: int, Nc: int, num_heads: int, block_len: int, stride: int):
    """Query chunks ``(q0, q1, 0, k1)`` with ``k1`` the blocks visible to query ``q1 - 1``.

    Each chunk is the longest run of queries (a multiple of ``stride``, at least one stride)
    whose ``[chunk * H, k1]`` score block fits the budget of :func:`nsa.ops.common.chunk_size`,
    so early chunks, which see few blocks, hold more queries: about half as many chunks (and
    per-chunk overheads) as one size for all."""

    def k1(q1):
        return min(Nc, visible_blocks(q1 - 1, block_len, stride))

    plan, q0 = [], 0
    while q0 < T:
        lo, hi = 1, -(-(T - q0) // stride)  # chunk = n * stride queries, n in [lo, hi]
        while lo < hi:  # the largest n that fits (k1 grows with the chunk, so fitting is monotone)
            n = (lo + hi + 1) // 2
            q1 = min(T, q0 + n * stride)
            if n * stride <= chunk_size(num_heads, max(1, k1(q1)), multiple=stride):
                lo = n
            else:
                hi = n - 1
        q1 = min(T, q0 + lo * stride)
        plan.append((q0, q1, 0, k1(q1)))
        q0 = q1
    return plan


def compressed_mask(block_len: int, stride: int, device):
    """``mask_fn(q0, q1, k0, k1) -> bool [q1-q0, k1-k0]``: block ``i`` visible iff ``i*d + l - 1 <= t``."""

    def mask_fn(q0, q1, k0, k1):
        t = torch.arange(q0, q1, device=device)
        last = torch.arange(k0, k1, device=device) * stride + block_len - 1
        return last[None, :] <= t[:, None]

    return mask_fn


def compressed_attention_dense(q, k_cmp, v_cmp, block_len, stride, scale, on_probs=None):
    """One sequence (no ``cu_seqlens``); ``on_probs`` as in :class:`nsa.ops.chunked.ChunkedAttention`."""
    plan = compressed_plan(q.shape[1], k_cmp.shape[1], q.shape[2], block_len, stride)
    return chunked_attention(q, k_cmp, v_cmp, scale, plan, compressed_mask(block_len, stride, q.device), on_probs)


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k_cmp [B,Nc,Hkv,Dk]``, ``v_cmp [B,Nc,Hkv,Dv]`` ->
    ``(o [B,T,H,Dv], lse [B,T,H] float32)``. With ``cu_seqlens`` (B == 1) each document
    attends only to its own compressed blocks, packed at ``compressed_cu_seqlens`` offsets."""
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return compressed_attention_dense(q, k_cmp, v_cmp, block_len, stride, scale)
    return per_document(
        lambda qd, kd, vd: compressed_attention_dense(qd, kd, vd, block_len, stride, scale),
        cu_seqlens,
        q,
        k_cmp,
        v_cmp,
        cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride),
        cmp_index=(1, 2),
    )
