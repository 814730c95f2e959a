"""PyTorch reference for block selection (the selected branch's top-n).

Per query chunk ``[q0, q1)`` (NSA_SPEC.md, "Selected branch"):

1. compressed probabilities ``p_t^(h)[i]`` over the visible compressed blocks, either by a
   softmax or, when the caller passes the compressed branch's ``lse``, as
   ``exp(q.k * scale - lse)`` (same values; saves the normaliser);
2. group sum ``P_t[i] = sum_{h in group} p_t^(h)[i]``;
3. overlap weighting ``S_t[j] = sum_{m < l'/d} sum_{u < l/d} P_t[(l'/d) j + m - u]``, done as
   a box filter of width ``l/d`` over ``i`` followed by summing groups of ``l'/d``;
4. forced blocks (the ``num_init`` first and the ``num_local`` most recent causal blocks) get
   score ``+inf``, non-causal blocks ``-inf``; the ``n``-th largest score is found with
   ``topk`` and used as a threshold: all blocks above it are taken, then the lowest-index
   blocks equal to it (ties to the lower index, exactly, without a full sort); the taken
   causal blocks are written in ascending order, ``-1`` after them.

Only a ``[chunk, G, Nc]`` score block exists at a time. Integer output: no autograd.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsa.ops.chunked import masked_scores
from nsa.ops.common import (
    acc_dtype,
    chunk_ranges,
    chunk_size,
    compressed_cu_seqlens,
    neg_inf_safe,
    num_select_blocks,
    per_document,
    resolve_scale,
    to_groups,
    to_kv_heads,
)
from nsa.ops.compressed_attention.reference import (
    compressed_attention_dense,
    compressed_mask,
    visible_blocks,
)


def overlap_scores(P: torch.Tensor, block_len: int, stride: int, select_len: int, nsel: int) -> torch.Tensor:
    """``P [..., Ncv]`` (group-summed probabilities of the visible blocks) -> ``S [..., nsel]``.

    ``S[j] = sum_{m < a} sum_{u < b} P[a*j + m - u]`` with ``a = l'/d``, ``b = l/d``; indices
    outside ``[0, Ncv)`` count 0. For ``l=32, d=16, l'=64`` the weights of ``P[4j-1..4j+3]``
    are ``1,2,2,2,1``.
    """
    a, b = select_len // stride, block_len // stride
    L = nsel * a
    P = F.pad(P[..., :L], (b - 1, L - min(L, P.shape[-1])))  # P[x] sits at x + b - 1
    box = sum(P[..., b - 1 - u : b - 1 - u + L] for u in range(b))  # box[x] = sum_u P[x - u]
    return box.reshape(*box.shape[:-1], nsel, a).sum(-1)


def top_blocks(scores, t, select_len: int, num_select: int, num_init: int, num_local: int):
    """``scores [..., C, nsel]`` for query positions ``t [C]`` -> int64 ``[..., C, n]`` ascending, -1 last.

    Exact top-n with ties to the lower index, without a full sort: the n-th largest key is
    the threshold; everything above it is taken, then the lowest-index blocks equal to it.
    """
    nsel, n = scores.shape[-1], num_select
    j = torch.arange(nsel, device=scores.device)
    cur = (t // select_len)[:, None]  # the block holding t
    causal = j <= cur
    forced = causal & ((j < num_init) | (j > cur - num_local))
    key = scores.masked_fill(forced, float("inf")).masked_fill(~causal, float("-inf"))
    thr = key.topk(min(n, nsel), dim=-1).values[..., -1:]
    above = key > thr
    tied = (key == thr) & causal
    take = above | (tied & (tied.cumsum(-1) <= n - above.sum(-1, keepdim=True)))
    slot = torch.where(take, take.cumsum(-1) - 1, n)  # rank among the taken (ascending j), or spare
    out = torch.full((*take.shape[:-1], n + 1), -1, dtype=torch.int64, device=scores.device)
    return out.scatter_(-1, slot, j.expand_as(slot))[..., :n]


@torch.no_grad()
def _select_dense(q, k_cmp, lse, block_len, stride, select_len, num_select, num_init, num_local, scale):
    acc, Hkv = acc_dtype(q.dtype), k_cmp.shape[2]
    qs, kh = to_groups(q, Hkv, acc) * scale, to_kv_heads(k_cmp, acc)
    lseg = to_groups(lse[..., None], Hkv, acc)[..., 0] if lse is not None else None
    B, _, T, G, _ = qs.shape
    out = torch.full((B, Hkv, T, num_select), -1, dtype=torch.int64, device=q.device)
    mask_fn = compressed_mask(block_len, stride, q.device)
    for q0, q1 in chunk_ranges(T, chunk_size(q.shape[2], kh.shape[2], multiple=select_len)):
        k1 = min(kh.shape[2], visible_blocks(q1 - 1, block_len, stride))
        if k1 > 0:
            s = masked_scores(qs, kh, q0, q1, 0, k1, mask_fn)  # [B, Hkv, C, G, k1]
            lse_c = lseg[:, :, q0:q1] if lseg is not None else torch.logsumexp(s, dim=-1)
            P = s.sub_(neg_inf_safe(lse_c)[..., None]).exp_().sum(3)  # group sum, [B, Hkv, C, k1]
        else:
            P = qs.new_zeros(B, Hkv, q1 - q0, 0)
        out[:, :, q0:q1] = blocks_from_probs(P, q0, q1, block_len, stride, select_len, num_select, num_init,
                                             num_local)
    return out.permute(0, 2, 1, 3).to(torch.int32).contiguous()


def blocks_from_probs(P, q0, q1, block_len, stride, select_len, num_select, num_init, num_local):
    """Group-summed compressed probabilities ``P [..., C, k1]`` of queries ``[q0, q1)`` (over the
    first ``k1`` blocks; later blocks count 0) -> int64 ``[..., C, n]`` selected blocks (steps 3-4)."""
    S = overlap_scores(P, block_len, stride, select_len, num_select_blocks(q1, select_len))
    t = torch.arange(q0, q1, device=P.device)
    return top_blocks(S, t, select_len, num_select, num_init, num_local)


def _compressed_and_select_dense(q, k_cmp, v_cmp, block_len, stride, select_len, num_select, num_init,
                                 num_local, scale):
    """Compressed attention whose forward also selects the blocks from its own probabilities."""
    B, T = q.shape[:2]
    Hkv = k_cmp.shape[2]
    sel = (block_len, stride, select_len, num_select, num_init, num_local)
    out = torch.full((B, Hkv, T, num_select), -1, dtype=torch.int64, device=q.device)

    def on_probs(q0, q1, k0, k1, e, inv_denom):  # the chunk's compressed softmax p = e * inv_denom (k1 may be 0)
        P = (inv_denom[..., None, :] @ e)[..., 0, :]  # group sum of p: [B, Hkv, C, k1]
        out[:, :, q0:q1] = blocks_from_probs(P, q0, q1, *sel)

    o, lse = compressed_attention_dense(q, k_cmp, v_cmp, block_len, stride, scale, on_probs)
    return o, lse, out.permute(0, 2, 1, 3).to(torch.int32).contiguous()


def compressed_attention_and_select(q, k_cmp, v_cmp, *, block_len, stride, select_len, num_select, num_init=1,
                                    num_local=2, scale=None, cu_seqlens=None):
    """``compressed_attention`` and ``select_blocks`` in one pass over the compressed scores:
    returns ``(o [B,T,H,Dv], lse [B,T,H], idx [B,T,Hkv,n] int32)``, the same as the two calls
    (the selection reads the attention's softmax instead of recomputing ``q . k_cmp``)."""
    scale = resolve_scale(scale, q.shape[-1])
    params = (block_len, stride, select_len, num_select, num_init, num_local, scale)
    if cu_seqlens is None:
        return _compressed_and_select_dense(q, k_cmp, v_cmp, *params)
    return per_document(
        lambda qd, kd, vd: _compressed_and_select_dense(qd, kd, vd, *params),
        cu_seqlens,
        q,
        k_cmp,
        v_cmp,
        cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride),
        cmp_index=(1, 2),
    )


def select_blocks(
    q,
    k_cmp,
    *,
    block_len,
    stride,
    select_len,
    num_select,
    num_init=1,
    num_local=2,
    scale=None,
    cu_seqlens=None,
    lse=None,
):
    """``q [B,T,H,Dk]``, ``k_cmp [B,Nc,Hkv,Dk]`` (optional ``lse [B,T,H]`` of the compressed
    branch) -> int32 ``[B,T,Hkv,num_select]`` selection-block indices, ascending, ``-1`` last."""
    scale = resolve_scale(scale, q.shape[-1])
    params = (block_len, stride, select_len, num_select, num_init, num_local, scale)
    if cu_seqlens is None:
        return _select_dense(q, k_cmp, lse, *params)
    cmp_cu = compressed_cu_seqlens(cu_seqlens, block_len, stride)
    if lse is None:
        return per_document(
            lambda qd, kd: _select_dense(qd, kd, None, *params),
            cu_seqlens,
            q,
            k_cmp,
            cmp_cu_seqlens=cmp_cu,
            cmp_index=(1,),
        )
    return per_document(
        lambda qd, kd, ld: _select_dense(qd, kd, ld, *params),
        cu_seqlens,
        q,
        k_cmp,
        lse,
        cmp_cu_seqlens=cmp_cu,
        cmp_index=(1,),
    )
