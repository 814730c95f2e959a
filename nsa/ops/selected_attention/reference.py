"""PyTorch reference for the selected branch.

Every head of KV group ``g`` at query ``t`` attends to the union of the tokens ``s <= t`` of
the selection blocks ``block_indices[t, g]`` (blocks ``[j*l', (j+1)*l')``; ``-1``, repeated
and non-causal indices are ignored). A query whose selection holds no valid token gets 0.

Method ("block tiles", chosen for CPU speed). The work is ``n`` (query, block) pairs per
query and group. Gathering each pair's ``l'`` keys would copy ``n*l'*D`` floats per query;
instead, per chunk of queries, the pairs are sorted by block and cut into tiles of ``R``
pairs that share one block, ``R*G ~ 64`` query rows. A tile is one small dense matmul:
``[R*G, Dk] @ [Dk, l']`` with the block's keys gathered once for the whole tile. The
softmax over a query's ``n`` blocks is done in two steps: each pair's log-sum-exp goes into
a dense ``[query, slot]`` table whose log-sum-exp over slots is the query's ``lse``; then
``p = exp(s - lse)`` and the pair outputs ``p @ V`` are put into the same table and summed
over slots (no scatter-add over queries). A custom autograd function keeps only ``o`` and
``lse`` and recomputes the tiles in backward (``dK``/``dV`` by ``index_add_`` per tile).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsa.ops.common import (
    acc_dtype,
    chunk_ranges,
    chunk_size,
    from_groups,
    neg_inf_safe,
    num_select_blocks,
    per_document,
    resolve_scale,
    to_groups,
)


def _blocks(x: torch.Tensor, select_len: int, dtype) -> torch.Tensor:
    """``[B, T, Hkv, D]`` -> ``[B*Hkv*Nsel, l', D]`` (zero-padded to whole blocks)."""
    B, T, Hkv, D = x.shape
    nsel = num_select_blocks(T, select_len)
    x = F.pad(x, (0, 0, 0, 0, 0, nsel * select_len - T))
    return x.view(B, nsel, select_len, Hkv, D).permute(0, 3, 1, 2, 4).to(dtype).reshape(-1, select_len, D)


def plan_tiles(idx: torch.Tensor, q0: int, T: int, nsel: int, select_len: int, R: int):
    """Tiles for queries ``[q0, q0 + C)`` from ``idx [BH, C, n]`` (int64 block indices).

    Returns ``key [NT]`` (``bh*nsel + j``, the tile's block), and per tile lane (``[NT, R]``):
    ``qrow`` (``bh*T + t``, row of the query), ``t`` (position, ``-1`` on padding lanes),
    ``pos`` (``(bh*C + c)*n + slot`` in the chunk's ``[query, slot]`` table; padding lanes
    point at a spare last entry ``BH*C*n``).
    """
    BH, C, n = idx.shape
    t = torch.arange(q0, q0 + C, device=idx.device)
    earlier = torch.ones(n, n, dtype=torch.bool, device=idx.device).tril(-1)
    repeated = ((idx[..., :, None] == idx[..., None, :]) & earlier).any(-1)
    valid = (idx >= 0) & (idx <= (t // select_len)[None, :, None]) & ~repeated
    bh, c, slot = valid.nonzero(as_tuple=True)
    key, order = torch.sort(bh * nsel + idx[bh, c, slot], stable=True)
    bh, c, slot = bh[order], c[order], slot[order]
    counts = torch.bincount(key, minlength=BH * nsel)
    ntiles = (counts + R - 1) // R
    rank = torch.arange(key.numel(), device=idx.device) - (torch.cumsum(counts, 0) - counts)[key]
    tile = (torch.cumsum(ntiles, 0) - ntiles)[key] + rank // R
    lane = rank % R
    NT = int(ntiles.sum())
    tile_key = torch.repeat_interleave(torch.arange(BH * nsel, device=idx.device), ntiles)
    qrow = torch.zeros(NT, R, dtype=torch.int64, device=idx.device)
    qrow[tile, lane] = bh * T + q0 + c
    tpos = torch.full((NT, R), -1, dtype=torch.int64, device=idx.device)
    tpos[tile, lane] = q0 + c
    pos = torch.full((NT, R), BH * C * n, dtype=torch.int64, device=idx.device)
    pos[tile, lane] = (bh * C + c) * n + slot
    return tile_key, qrow, tpos, pos


def _tile_scores(qrows, kb, plan, nsel, select_len, scale):
    """Masked scores ``[NT, R, G, l']`` and the gathered ``Q [NT, R*G, Dk]``, ``K [NT, l', Dk]``."""
    key, qrow, tpos, _ = plan
    NT, R = qrow.shape
    G = qrows.shape[1]
    Qt = qrows[qrow].view(NT, R * G, -1)
    Kt = kb[key]
    s = ((Qt @ Kt.transpose(1, 2)) * scale).view(NT, R, G, select_len)
    kpos = (key % nsel)[:, None] * select_len + torch.arange(select_len, device=key.device)
    s.masked_fill_((kpos[:, None, :] > tpos[:, :, None])[:, :, None, :], float("-inf"))
    return s, Qt, Kt


def _to_table(values: torch.Tensor, pos: torch.Tensor, rows: int, n: int, fill: float) -> torch.Tensor:
    """Put per-lane ``values [NT, R, ...]`` at ``pos`` into a ``[rows, n, ...]`` table (spare entry dropped)."""
    flat = values.reshape(pos.numel(), -1)
    table = flat.new_full((rows * n + 1, flat.shape[1]), fill)
    table[pos.reshape(-1)] = flat
    return table[:-1].view(rows, n, *values.shape[2:])


def _row_of(pos: torch.Tensor, n: int) -> torch.Tensor:
    """Chunk query row ``bh*C + c`` of each lane (``BH*C`` on padding lanes)."""
    return pos // n


class SelectedAttention(torch.autograd.Function):
    """Block-tile selected attention; saves ``o``, ``lse`` and the tile plans for backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_len, scale):
        acc, (B, T, Hkv, _), n = acc_dtype(q.dtype), k.shape, block_indices.shape[-1]
        G = q.shape[2] // Hkv
        BH, nsel = B * Hkv, num_select_blocks(T, select_len)
        qrows = to_groups(q, Hkv, acc).view(BH * T, G, -1)
        kb, vb = _blocks(k, select_len, acc), _blocks(v, select_len, acc)
        idx = block_indices.permute(0, 2, 1, 3).reshape(BH, T, n).to(torch.int64)
        R = max(1, 64 // G)
        o = qrows.new_zeros(BH, T, G, v.shape[-1])
        lse = qrows.new_full((BH, T, G), float("-inf"))
        plans = []
        for q0, q1 in chunk_ranges(T, chunk_size(B * q.shape[2] * n, select_len, multiple=select_len)):
            C = q1 - q0
            plan = plan_tiles(idx[:, q0:q1], q0, T, nsel, select_len, R)
            s, _, _ = _tile_scores(qrows, kb, plan, nsel, select_len, scale)
            lse_c = torch.logsumexp(
                _to_table(torch.logsumexp(s, -1), plan[3], BH * C, n, float("-inf")), dim=1
            )
            lse_ext = F.pad(neg_inf_safe(lse_c), (0, 0, 0, 1))  # spare row for padding lanes
            p = torch.exp_(s.sub_(lse_ext[_row_of(plan[3], n)][..., None]))
            o_pair = p.view(p.shape[0], -1, select_len) @ vb[plan[0]]
            o[:, q0:q1] = (
                _to_table(o_pair.view(*plan[1].shape, G, -1), plan[3], BH * C, n, 0.0)
                .sum(1)
                .view(BH, C, G, -1)
            )
            lse[:, q0:q1] = lse_c.view(BH, C, G)
            plans.append((q0, q1, plan))
        ctx.save_for_backward(q, k, v, o, lse)
        ctx.plans, ctx.select_len, ctx.scale, ctx.n = plans, select_len, scale, n
        return from_groups(o.view(B, Hkv, T, G, -1)).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse = ctx.saved_tensors
        (B, T, Hkv, Dk), acc, l, scale, n = k.shape, o.dtype, ctx.select_len, ctx.scale, ctx.n
        BH, G, nsel = B * Hkv, o.shape[2], num_select_blocks(T, l)
        qrows = to_groups(q, Hkv, acc).view(BH * T, G, -1)
        dorows = to_groups(do, Hkv, acc).view(BH, T, G, -1)
        kb, vb = _blocks(k, l, acc), _blocks(v, l, acc)
        delta = (dorows * o).sum(-1)  # [BH, T, G]
        dq = torch.zeros_like(qrows).view(BH, T, G, Dk)
        dkb, dvb = torch.zeros_like(kb), torch.zeros_like(vb)
        dorows = dorows.view(BH * T, G, -1)
        for q0, q1, plan in ctx.plans:
            key, qrow, _, pos = plan
            NT, R = qrow.shape
            C = q1 - q0
            rows = _row_of(pos, n)
            s, Qt, Kt = _tile_scores(qrows, kb, plan, nsel, l, scale)
            lse_ext = F.pad(neg_inf_safe(lse[:, q0:q1].reshape(BH * C, G)), (0, 0, 0, 1))
            delta_ext = F.pad(delta[:, q0:q1].reshape(BH * C, G), (0, 0, 0, 1))
            p = torch.exp_(s.sub_(lse_ext[rows][..., None])).view(NT, R * G, l)
            dOt = dorows[qrow].view(NT, R * G, -1)
            Vt = vb[key]
            dvb.index_add_(0, key, p.transpose(1, 2) @ dOt)
            ds = p * ((dOt @ Vt.transpose(1, 2)).view(NT, R, G, l) - delta_ext[rows][..., None]).view(
                NT, R * G, l
            )
            dkb.index_add_(0, key, (ds.transpose(1, 2) @ Qt) * scale)
            dq_pair = ((ds @ Kt) * scale).view(NT, R, G, Dk)
            dq[:, q0:q1] = _to_table(dq_pair, pos, BH * C, n, 0.0).sum(1).view(BH, C, G, Dk)
        dk = dkb.view(B, Hkv, nsel * l, Dk)[:, :, :T].permute(0, 2, 1, 3)
        dv = dvb.view(B, Hkv, nsel * l, -1)[:, :, :T].permute(0, 2, 1, 3)
        dq = from_groups(dq.view(B, Hkv, T, G, Dk))
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None


def _selected_dense(q, k, v, block_indices, select_len, scale):
    return SelectedAttention.apply(q, k, v, block_indices, select_len, scale)


def selected_attention(q, k, v, block_indices, *, select_len, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]``, ``block_indices [B,T,Hkv,n]``
    -> ``o [B,T,H,Dv]``. With ``cu_seqlens`` (B == 1) indices are relative to each document."""
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return _selected_dense(q, k, v, block_indices, select_len, scale)
    return per_document(
        lambda qd, kd, vd, bd: _selected_dense(qd, kd, vd, bd, select_len, scale),
        cu_seqlens,
        q,
        k,
        v,
        block_indices,
    )
