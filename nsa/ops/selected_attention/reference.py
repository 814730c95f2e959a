"""PyTorch reference for the selected branch.

Every head of KV group ``g`` at query ``t`` attends to the union of the tokens ``s <= t`` of
the selection blocks ``block_indices[t, g]`` (blocks ``[j*l', (j+1)*l')``; ``-1``, repeated
and non-causal indices are ignored). A query whose selection holds no valid token gets 0.

Method ("block tiles", chosen for CPU speed). The work is ``n`` (query, block) pairs per
query and group. Gathering each pair's ``l'`` keys would copy ``n*l'*D`` floats per query;
instead, per chunk of queries, the pairs are sorted by block and cut into tiles of ``R``
pairs ("lanes") that share one block, ``R*G ~ 128`` query rows. A tile is one small dense
matmul ``[R*G, Dk] @ [Dk, l']`` with the block's keys gathered once for the whole tile, and
only the tiles holding a query's own (diagonal) block need a causal mask.

Softmax across a query's blocks in one pass over each chunk's tiles (processed in
cache-sized batches), flash-attention style: each lane's scores give its max ``m``, its
``exp(s - m)`` sum and its un-normalised ``exp(s - m) @ V``, held for the chunk (at most
``LANE_BUDGET`` floats); since a chunk holds every lane of its queries, the lanes are then
combined once under each row's max (``scatter_reduce`` max, ``index_add_``) and ``o`` is
normalised at the end. A custom autograd function keeps only
``o``, ``lse`` and the tile plans; backward recomputes the tiles and scatters
``dq``/``dk``/``dv`` with ``index_add_`` (``dk``/``dv`` once per tile, not per lane).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from nsa.ops.common import (
    SCORE_BUDGET,
    acc_dtype,
    chunk_ranges,
    from_groups,
    neg_inf_safe,
    num_select_blocks,
    per_document,
    resolve_scale,
    to_groups,
)

ROWS_PER_TILE = 128  # R * G: query rows in one tile's matmul (bench/RESULTS.md: faster than 64 or 32, no worse than 256)
QUERIES_PER_PLAN = 1024  # queries whose (query, block) pairs are sorted into tiles together (at most)
LANE_BUDGET = 1 << 24  # floats of the per-lane outputs a chunk holds in the forward (64 MB in float32)


def queries_per_plan(lane_floats_per_query: int) -> int:
    """Queries per plan: ``QUERIES_PER_PLAN``, fewer when their lanes' outputs (``n * G * Dv``
    floats per query and KV head) would pass ``LANE_BUDGET``; at least 16."""
    return max(16, min(QUERIES_PER_PLAN, LANE_BUDGET // max(1, lane_floats_per_query)))


def _blocks(x: torch.Tensor, select_len: int, dtype, transposed: bool = False) -> torch.Tensor:
    """``[B, T, Hkv, D]`` -> ``[B*Hkv*Nsel, l', D]`` (zero-padded to whole blocks), or
    contiguous ``[B*Hkv*Nsel, D, l']`` if ``transposed``: a matmul whose right operand is a
    transposed view runs about half as fast on these small tiles (one core, ``[128, 64] @
    [64, 64]``: 52-68 against 125 GFLOP/s), so blocks used as ``K^T`` are stored transposed."""
    B, T, Hkv, D = x.shape
    nsel = num_select_blocks(T, select_len)
    x = F.pad(x, (0, 0, 0, 0, 0, nsel * select_len - T))
    x = x.view(B, nsel, select_len, Hkv, D).permute(0, 3, 1, 2, 4).to(dtype).reshape(-1, select_len, D)
    return x.transpose(1, 2).contiguous() if transposed else x


def _rows(x: torch.Tensor, num_kv_heads: int, dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> ``[B*Hkv*T + 1, G, D]``: one row per (KV head, token), plus a zero
    spare row that padding lanes read from and write to."""
    g = to_groups(x, num_kv_heads, dtype)
    return F.pad(g.reshape(-1, *g.shape[-2:]), (0, 0, 0, 0, 0, 1))


def plan_tiles(idx: torch.Tensor, q0: int, T: int, nsel: int, select_len: int, R: int):
    """Tiles for queries ``[q0, q0 + C)`` from ``idx [BH, C, n]`` (int64 block indices).

    Returns ``key [NT]`` (``bh*nsel + j``: the tile's block), ``row [NT*R]`` (``bh*T + t``:
    each lane's query row; ``BH*T``, the spare row, on padding lanes), ``tpos [NT, R]`` (each
    lane's position ``t``, ``-1`` on padding lanes) and ``diag [NT]`` (bool: the tile's block
    reaches past one of its queries, so it needs the causal mask).
    """
    BH, C, n = idx.shape
    dev = idx.device
    t = torch.arange(q0, q0 + C, device=dev)
    earlier = torch.ones(n, n, dtype=torch.bool, device=dev).tril(-1)
    repeated = ((idx[..., :, None] == idx[..., None, :]) & earlier).any(-1)
    valid = (idx >= 0) & (idx <= (t // select_len)[None, :, None]) & ~repeated
    bh, c, slot = valid.nonzero(as_tuple=True)
    key, order = torch.sort(bh * nsel + idx[bh, c, slot], stable=True)
    bh, c = bh[order], c[order]
    counts = torch.bincount(key, minlength=BH * nsel)
    ntiles = (counts + R - 1) // R
    rank = torch.arange(key.numel(), device=dev) - (torch.cumsum(counts, 0) - counts)[key]
    lane = ((torch.cumsum(ntiles, 0) - ntiles)[key] + rank // R) * R + rank % R
    NT = int(ntiles.sum())
    row = torch.full((NT * R,), BH * T, dtype=torch.int64, device=dev)
    row[lane] = bh * T + q0 + c
    tpos = torch.full((NT * R,), -1, dtype=torch.int64, device=dev)
    tpos[lane] = q0 + c
    tile_key = torch.repeat_interleave(torch.arange(BH * nsel, device=dev), ntiles)
    tpos = tpos.view(NT, R)
    last = (tile_key % nsel + 1) * select_len - 1  # last token of the tile's block
    return tile_key, row, tpos, ((tpos >= 0) & (tpos < last[:, None])).any(1)


def tile_batches(plan, R: int, tiles_per_batch: int):
    """Split a chunk's plan into batches of tiles, so a batch's score block stays cache-sized."""
    key, row, tpos, diag = plan
    for a, b in chunk_ranges(key.numel(), tiles_per_batch):
        yield key[a:b], row[a * R : b * R], tpos[a:b], diag[a:b]


class Workspace:
    """Buffers reused by every tile batch of a call, grown on demand.

    Each batch's gathers and matmul outputs are a few MB; allocated afresh they come from
    pages the C allocator has just handed back to the OS, and the page faults cost about as
    much as the matmuls. With reuse (and key blocks stored transposed, see :func:`_blocks`),
    one core, T = 8k, H = 16, Hkv = 2: forward 1.04 -> 0.74 s, backward 1.45 -> 1.14 s."""

    def __init__(self, like: torch.Tensor):
        self.like, self.bufs = like, {}

    def get(self, name: str, *shape: int) -> torch.Tensor:
        numel = math.prod(shape)
        buf = self.bufs.get(name)
        if buf is None or buf.numel() < numel:
            buf = self.bufs[name] = self.like.new_empty(numel)
        return buf[:numel].view(shape)


def _gather(x: torch.Tensor, index: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``x[index]`` (along dim 0) written into ``out``."""
    return torch.index_select(x, 0, index, out=out)


def _tile_scores(qrows, kbT, batch, nsel: int, select_len: int, ws: Workspace):
    """Scores ``[nt, R*G, l']`` of the (pre-scaled) query rows against their tile's block (keys
    ``kbT [NB, Dk, l']``, transposed), the causal mask applied on diagonal tiles; also the
    gathered ``Q [nt, R*G, Dk]``. Both live in ``ws`` (valid until its next use)."""
    key, row, tpos, diag = batch
    nt, G, Dk = key.numel(), qrows.shape[1], qrows.shape[2]
    Qt = _gather(qrows, row, ws.get("q", row.numel(), G, Dk)).view(nt, -1, Dk)
    KtT = _gather(kbT, key, ws.get("kT", nt, *kbT.shape[1:]))
    s = torch.bmm(Qt, KtT, out=ws.get("s", nt, Qt.shape[1], select_len))
    d = diag.nonzero()[:, 0]
    if d.numel():  # mask in place over the run of tiles from the first diagonal one to the last
        a, b = int(d[0]), int(d[-1]) + 1
        kpos = (key[a:b] % nsel)[:, None] * select_len + torch.arange(select_len, device=key.device)
        lane_t = tpos[a:b].masked_fill(tpos[a:b] < 0, kpos.max())  # padding lanes: nothing hidden
        hidden = kpos[:, None, :] > lane_t[:, :, None]  # [b - a, R, l']
        s[a:b].view(b - a, -1, G, select_len).masked_fill_(hidden[:, :, None, :], float("-inf"))
    return s, Qt


class SelectedAttention(torch.autograd.Function):
    """Block-tile selected attention; saves ``o``, ``lse`` and the tile plans for backward."""

    @staticmethod
    def forward(ctx, q, k, v, block_indices, select_len, scale):
        acc, (B, T, Hkv, _), n = acc_dtype(q.dtype), k.shape, block_indices.shape[-1]
        G, Dv = q.shape[2] // Hkv, v.shape[-1]
        BH, nsel, l = B * Hkv, num_select_blocks(T, select_len), select_len
        qrows = _rows(q, Hkv, acc).mul_(scale)
        kbT, vb = _blocks(k, l, acc, transposed=True), _blocks(v, l, acc)
        idx = block_indices.permute(0, 2, 1, 3).reshape(BH, T, n).to(torch.int64)
        R = max(1, ROWS_PER_TILE // G)
        tb = max(1, SCORE_BUDGET // (R * G * l))
        o = qrows.new_zeros(BH * T + 1, G, Dv)  # un-normalised: sum of exp(s - m) V
        m = qrows.new_full((BH * T + 1, G), float("-inf"))  # max score of each query row
        tot = torch.zeros_like(m)  # sum of exp(s - m)
        plans = [plan_tiles(idx[:, q0:q1], q0, T, nsel, l, R)
                 for q0, q1 in chunk_ranges(T, queries_per_plan(BH * n * G * Dv))]
        ws = Workspace(qrows)
        ws.get("o_lane", max((plan[0].numel() for plan in plans), default=0), R * G, Dv)  # once, the largest
        for plan in plans:
            row = plan[1]
            # every lane's max, exp-sum and exp(s - max) @ V, held for the whole chunk
            m_lane, tot_lane = ws.get("m_lane", row.numel(), G), ws.get("tot_lane", row.numel(), G)
            o_lane = ws.get("o_lane", plan[0].numel(), R * G, Dv)
            for i, batch in enumerate(tile_batches(plan, R, tb)):
                key = batch[0]
                tiles, lanes = slice(i * tb, i * tb + key.numel()), slice(i * tb * R, (i * tb + key.numel()) * R)
                s = _tile_scores(qrows, kbT, batch, nsel, l, ws)[0].view(-1, G, l)
                torch.amax(s, -1, out=m_lane[lanes])  # finite: a lane sees its block's first key
                e = s.sub_(m_lane[lanes, :, None]).exp_()  # (padding lanes score 0)
                torch.sum(e, -1, out=tot_lane[lanes])
                Vt = _gather(vb, key, ws.get("v", key.numel(), l, Dv))
                torch.bmm(e.view(key.numel(), -1, l), Vt, out=o_lane[tiles])
            # a chunk holds all lanes of its queries: combine them under each row's max
            m.scatter_reduce_(0, row[:, None].expand(-1, G), m_lane, "amax")
            w = m_lane.sub_(m[row]).exp_()
            o.index_add_(0, row, o_lane.view(-1, G, Dv).mul_(w[..., None]))
            tot.index_add_(0, row, tot_lane.mul_(w))
        o = o / torch.where(tot > 0, tot, 1.0)[..., None]
        lse = m + torch.log(tot)  # -inf for rows without a visible key
        out = from_groups(o[:-1].view(B, Hkv, T, G, Dv)).to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse[:-1])  # the returned o, not a second copy
        ctx.plans, ctx.select_len, ctx.scale, ctx.tb = plans, select_len, scale, tb
        return out

    @staticmethod
    def backward(ctx, do):
        q, k, v, out, lse = ctx.saved_tensors
        (B, T, Hkv, Dk), acc, l = k.shape, lse.dtype, ctx.select_len
        G, nsel = lse.shape[1], num_select_blocks(T, l)
        R = max(1, ROWS_PER_TILE // G)
        qrows = _rows(q, Hkv, acc).mul_(ctx.scale)
        dorows = _rows(do, Hkv, acc)
        kb, vbT = _blocks(k, l, acc), _blocks(v, l, acc, transposed=True)
        kbT = kb.transpose(1, 2).contiguous()  # both layouts of K's blocks: scores and dq
        # spare row: lse = +inf makes padding lanes' probabilities exactly 0
        lse = F.pad(neg_inf_safe(lse), (0, 0, 0, 1), value=float("inf"))
        delta = to_groups((do.to(acc) * out.to(acc)).sum(-1, keepdim=True), Hkv, acc)  # rowsum(dO * O)
        delta = F.pad(delta.reshape(-1, G), (0, 0, 0, 1))  # [BH*T + 1, G]
        dq, dkb, dvb = torch.zeros_like(qrows), torch.zeros_like(kb), qrows.new_zeros(vbT.shape[0], l, vbT.shape[1])
        ws, Dv = Workspace(qrows), vbT.shape[1]
        for plan in ctx.plans:
            for batch in tile_batches(plan, R, ctx.tb):
                key, row = batch[0], batch[1]
                nt = key.numel()
                s, Qt = _tile_scores(qrows, kbT, batch, nsel, l, ws)
                p = s.view(-1, G, l).sub_(lse[row][..., None]).exp_().view(nt, -1, l)
                dOt = _gather(dorows, row, ws.get("do", row.numel(), G, Dv)).view(nt, -1, Dv)
                dvb.index_add_(0, key, torch.bmm(p.transpose(1, 2), dOt, out=ws.get("dv", nt, l, Dv)))
                VtT = _gather(vbT, key, ws.get("v", nt, Dv, l))
                ds = torch.bmm(dOt, VtT, out=ws.get("ds", nt, Qt.shape[1], l))
                ds = ds.view(-1, G, l).sub_(delta[row][..., None]).view(nt, -1, l).mul_(p)
                dkb.index_add_(0, key, torch.bmm(ds.transpose(1, 2), Qt, out=ws.get("dk", nt, l, Dk)))
                Kt = _gather(kb, key, ws.get("k", nt, l, Dk))
                dq.index_add_(0, row, torch.bmm(ds, Kt, out=ws.get("dq", nt, Qt.shape[1], Dk)).view(-1, G, Dk))
        dk = dkb.view(B, Hkv, nsel * l, Dk)[:, :, :T].permute(0, 2, 1, 3)
        dv = dvb.view(B, Hkv, nsel * l, -1)[:, :, :T].permute(0, 2, 1, 3)
        dq = from_groups(dq[:-1].view(B, Hkv, T, G, Dk)) * ctx.scale
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
