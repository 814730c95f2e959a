"""Selection distillation: an optional training signal for the block ranking (not in NSA_SPEC.md).

NSA picks each query's blocks by its compressed attention's probabilities (``select_blocks``), and
the top-n choice passes no gradient: the ranking learns only through the compressed branch's own
output, which its gate keeps small. In the retrieval probe that ranking is what fails
(docs/results/retrieval_probe/seeds): the look-up over the chosen blocks is as good as full
attention's, the choice misses the answer's block at some seeds. This loss trains the ranking
directly, the way DeepSeek-V3.2's sparse attention trains its block indexer: for every query and
KV group, the KL divergence from the selected branch's attention mass over the *free* selected
blocks (the target, no gradient) to the group's selection scores over the same blocks, renormalised.
The forced blocks (``num_init`` first, ``num_local`` newest) are left out: their place does not
depend on the ranking, and the newest holds no complete compressed block yet.

The gradient reaches the compressed keys only (``q`` is detached): the ranking is taught through
phi and the compressed branch's key projection, and the queries, which the token-level look-up
needs, are left to the language-model loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from nsa.ops.chunked import masked_scores
from nsa.ops.common import (
    acc_dtype,
    chunk_ranges,
    chunk_size,
    compressed_cu_seqlens,
    num_select_blocks,
    per_document,
    resolve_scale,
    to_groups,
    to_kv_heads,
)
from nsa.ops.compressed_attention.reference import compressed_mask, visible_blocks
from nsa.ops.select_blocks.reference import overlap_scores

# elements of one chunk's score block: 4M floats = 16 MB; larger than the ops' cache-sized chunks
# because this runs once per layer and step, and few chunks keep the per-chunk overhead small
DISTILL_BUDGET = 1 << 22


def _free_blocks(idx, q0, q1, select_len, num_init, num_local):
    """``idx [B, Hkv, C, n]`` (selected blocks of queries ``[q0, q1)``, -1 = none) -> bool, True on
    the blocks chosen by score rather than forced."""
    cur = (torch.arange(q0, q1, device=idx.device) // select_len)[:, None]
    return (idx >= max(num_init, 0)) & (idx <= cur - num_local)  # -1 (none) is never free


@torch.no_grad()
def _target(qs, ks, idx, free, q0, q1, select_len):
    """The selected branch's attention mass on each free selected block, summed over the group's
    heads and renormalised over those blocks: ``[B, Hkv, C, n]`` (0 off the free blocks).

    The chunk's queries read their blocks from the union of their selections (neighbouring
    queries mostly pick the same blocks), so the keys of that union are gathered once and
    scored densely against every query of the chunk, each query masked to its own blocks."""
    B, Hkv, T, G, Dk = qs.shape
    C, lp = q1 - q0, select_len
    nsel = -(-q1 // lp)
    used = torch.zeros(B, Hkv, nsel + 1, dtype=torch.bool, device=idx.device)
    used.scatter_(-1, torch.where(idx >= 0, idx, nsel).reshape(B, Hkv, -1), True)
    used = used[..., :nsel]
    U = int(used.sum(-1).max())
    blocks = torch.sort((~used).to(torch.int8), dim=-1, stable=True).indices[..., :U]  # used first, ascending
    slot = torch.full((B, Hkv, nsel + 1), U, dtype=torch.int64, device=idx.device)  # block -> its column
    slot.scatter_(-1, blocks, torch.arange(U, device=idx.device).expand(B, Hkv, U))
    col = slot.gather(-1, torch.where(idx >= 0, idx, nsel).reshape(B, Hkv, -1)).view(B, Hkv, C, -1)  # [B, Hkv, C, n]
    mine = torch.zeros(B, Hkv, C, U + 1, dtype=torch.bool, device=idx.device).scatter_(-1, col, True)[..., :U]
    tok = (blocks[..., None] * lp + torch.arange(lp, device=idx.device)).view(B, Hkv, U * lp)
    kg = torch.gather(ks, 2, tok.clamp_max(T - 1)[..., None].expand(-1, -1, -1, Dk))  # [B, Hkv, U*l', Dk]
    s = (qs[:, :, q0:q1].reshape(B, Hkv, C * G, Dk) @ kg.transpose(-1, -2)).view(B, Hkv, C, G, U, lp)
    t = torch.arange(q0, q1, device=idx.device)[:, None, None]
    ok = mine[..., None] & (tok.view(B, Hkv, 1, U, lp) <= t)  # [B, Hkv, C, U, l']
    s.masked_fill_(~ok[:, :, :, None], float("-inf"))
    mass = s.view(B, Hkv, C, G, U * lp).softmax(-1).view(B, Hkv, C, G, U, lp).sum((3, 5))  # [B, Hkv, C, U]
    mass = F.pad(mass, (0, 1)).gather(-1, col) * free  # per slot of idx
    return mass / mass.sum(-1, keepdim=True).clamp_min(torch.finfo(mass.dtype).tiny)


def _chunk_kl(qs, kh, idx, free, target, q0, q1, block_len, stride, select_len):
    """KL(target || the group's selection scores over the free blocks) per query: ``[B, Hkv, C]``."""
    k1 = min(kh.shape[2], visible_blocks(q1 - 1, block_len, stride))
    s = masked_scores(qs, kh, q0, q1, 0, k1, compressed_mask(block_len, stride, qs.device))  # [B, Hkv, C, G, k1]
    e = (s - s.detach().amax(-1, keepdim=True).clamp_min(-1e30)).exp()  # 0 on hidden blocks, never NaN
    P = (e / e.sum(-1, keepdim=True).clamp_min(1e-30)).sum(3)  # group-summed probabilities [B, Hkv, C, k1]
    S = overlap_scores(P, block_len, stride, select_len, num_select_blocks(q1, select_len))
    log_s = S.gather(-1, idx.clamp(0, S.shape[-1] - 1)).clamp_min(1e-30).log()
    log_s = log_s.masked_fill(~free, -1e4)  # finite: exp() = 0, and no NaN where no block is free
    log_student = log_s - log_s.logsumexp(-1, keepdim=True)
    kl = torch.xlogy(target, target) - target * log_student
    return kl.masked_fill(~free, 0.0).sum(-1)


def _selection_distill_dense(q, k_cmp, k_slc, idx, block_len, stride, select_len, num_init, num_local, scale):
    acc, Hkv = acc_dtype(q.dtype), k_cmp.shape[2]
    qs = to_groups(q.detach(), Hkv, acc) * scale
    kh, ks = to_kv_heads(k_cmp, acc), to_kv_heads(k_slc.detach(), acc)
    B, _, T, G, Dk = qs.shape
    idx = idx.permute(0, 2, 1, 3).to(torch.int64)  # [B, Hkv, T, n]
    n = idx.shape[-1]
    kl, valid = [], torch.zeros(B, Hkv, T, dtype=torch.bool, device=q.device)
    # a chunk's queries read at most n blocks each, mostly shared: budget for a union of 2n blocks
    step = chunk_size(B * Hkv * G, min(T, 2 * n * select_len), DISTILL_BUDGET, multiple=select_len)
    for q0, q1 in chunk_ranges(T, step):
        ic = idx[:, :, q0:q1]
        free = _free_blocks(ic, q0, q1, select_len, num_init, num_local)
        valid[:, :, q0:q1] = free.sum(-1) >= 2  # one free block: nothing to rank
        if not bool(valid[:, :, q0:q1].any()):
            kl.append(qs.new_zeros(B, Hkv, q1 - q0))
            continue
        target = _target(qs, ks, ic, free, q0, q1, select_len)
        args = (qs, kh, ic, free, target, q0, q1, block_len, stride, select_len)
        if torch.is_grad_enabled() and kh.requires_grad:  # recompute in backward: memory of one chunk
            kl.append(checkpoint(_chunk_kl, *args, use_reentrant=False))
        else:
            kl.append(_chunk_kl(*args))
    kl = torch.cat(kl, 2) if kl else qs.new_zeros(B, Hkv, T)
    return kl.permute(0, 2, 1), valid.permute(0, 2, 1)


def selection_distill(q, k_cmp, k_slc, idx, *, block_len, stride, select_len, num_init=1, num_local=2, scale=None,
                      cu_seqlens=None):
    """``q [B,T,H,Dk]`` (with RoPE), ``k_cmp [B,Nc,Hkv,Dk]``, the selected branch's keys ``k_slc
    [B,T,Hkv,Dk]`` and the selection ``idx [B,T,Hkv,n]`` (from ``select_blocks``) ->
    ``(kl [B,T,Hkv], valid [B,T,Hkv] bool)``: per query and KV group, the KL divergence of the
    selection scores from the selected attention's block mass over the free selected blocks
    (``valid`` False, ``kl`` 0, where fewer than two blocks are free). Differentiable in ``k_cmp``."""
    scale = resolve_scale(scale, q.shape[-1])
    params = (block_len, stride, select_len, num_init, num_local, scale)
    if cu_seqlens is None:
        kl, valid = _selection_distill_dense(q, k_cmp, k_slc, idx, *params)
    else:
        kl, valid = per_document(lambda qd, kd, sd, id_: _selection_distill_dense(qd, kd, sd, id_, *params),
                                 cu_seqlens, q, k_cmp, k_slc, idx,
                                 cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride), cmp_index=(1,))
    if k_cmp.requires_grad:  # k_cmp stays in the graph even where no query has blocks to rank: under
        # ZeRO-3 every rank must run the same backward (its parameter gathers are collectives)
        kl = kl + 0.0 * k_cmp.sum()
    return kl, valid
