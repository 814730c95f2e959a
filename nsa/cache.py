"""Decoding state of one NSA layer, and the attention of new tokens against it.

Per layer and per branch (NSA_SPEC.md, "Decoding"):

* selected branch: the raw (RoPE'd) K/V of every token, ``[B, max_len, Hkv, D]``;
* window branch: the K/V of the last ``w`` tokens, a ring buffer ``[B, w, Hkv, D]``
  where position ``p`` lives in slot ``p % w``;
* compressed branch: the raw K/V of the last ``l - 1`` tokens (every compression
  block not yet complete lies inside them) and the compressed K/V
  ``[B, Nmax, Hkv, D]``, one entry appended every ``d`` tokens once a block of
  ``l`` tokens completes.

All rows of the batch share one length. A decode step for ``m`` new tokens
(usually one) reads only this state: ``floor((s - l)/d) + 1`` compressed
entries, the ``n`` selected blocks and the window, as counted by
:func:`kv_tokens_read`. The math is a small dense torch path (no Triton): for
one token it touches a few thousand keys, so a kernel launch per branch
would cost more than it saves. On CPU float32 the layer runs a one-token step
on a fused C++ op instead (``nsa.ops.decode_cpu``); :func:`decode_token` is its
reference.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from nsa.ops.common import BRANCHES

TAIL_ROOM = 64  # new tokens the compressed branch's tail buffer takes before it is compacted


def kv_tokens_read(context_len: int, *, block_len: int, stride: int, select_len: int, num_select: int,
                   window: int) -> dict[str, int]:
    """K/V tokens one NSA decode step reads at context length ``s`` (tokens incl. the new one).

    Counted per branch as the paper does (Table 4): ``floor((s - l)/d) + 1``
    compressed entries, ``n * l'`` selected tokens, ``w`` window tokens. The
    selected and window counts are capped at ``s`` (a short context cannot
    read more tokens than it has); for ``s >= max(n*l', w)`` they are exactly
    the paper's. Returns ``{"compressed", "selected", "window", "total"}``.
    """
    for name, v in (("context_len", context_len), ("block_len", block_len), ("stride", stride),
                    ("select_len", select_len), ("num_select", num_select), ("window", window)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name == "context_len" else 1):
            raise ValueError(f"kv_tokens_read: {name} must be a positive int, got {v!r}")
    s = context_len
    out = {
        "compressed": (s - block_len) // stride + 1 if s >= block_len else 0,
        "selected": min(num_select * select_len, s),
        "window": min(window, s),
    }
    out["total"] = sum(out.values())
    return out


class NSACache:
    """Decoding state of one :class:`nsa.layer.NSAAttention` layer for ``B`` rows of equal length.

    Build it with ``NSAAttention.new_cache(batch_size, max_len, device, dtype)``;
    the layer fills it (prefill) and extends it (decode) when passed as ``cache=``.
    """

    def __init__(self, *, batch_size: int, max_len: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int,
                 block_len: int, stride: int, select_len: int, window: int, device=None,
                 dtype: torch.dtype = torch.float32):
        if batch_size < 1 or max_len < 1:
            raise ValueError(f"NSACache: batch_size and max_len must be >= 1, got {batch_size}, {max_len}")
        self.batch_size, self.max_len = batch_size, max_len
        self.block_len, self.stride, self.select_len, self.window = block_len, stride, select_len, window
        self.length = 0
        B, Hkv, Dk, Dv = batch_size, num_kv_heads, head_dim_k, head_dim_v
        # Buffers are head-major [B, Hkv, n, D], so a step's matmuls read them in place (a token-major
        # buffer would be copied into that layout by every einsum/bmm); the attributes below are
        # token-major views [B, n, Hkv, D] of them.
        new = lambda n, d: torch.zeros(B, Hkv, n, d, device=device, dtype=dtype)
        n_cmp = (max_len - block_len) // stride + 1 if max_len >= block_len else 0
        n_blocks = -(-max_len // select_len)  # the raw buffer holds whole selection blocks
        self._k_slc, self._v_slc = new(n_blocks * select_len, Dk), new(n_blocks * select_len, Dv)
        self._k_win, self._v_win = new(window, Dk), new(window, Dv)
        self._k_cmp, self._v_cmp = new(n_cmp, Dk), new(n_cmp, Dv)
        # raw compressed-branch K/V of the incomplete blocks: tokens [_t0, _t1) of a buffer with room
        # for TAIL_ROOM new tokens before it is compacted, so a step appends in place
        self._k_tail, self._v_tail = new(block_len - 1 + TAIL_ROOM, Dk), new(block_len - 1 + TAIL_ROOM, Dv)
        self._t0 = self._t1 = 0
        self.num_cmp = 0

    k_slc = property(lambda self: self._k_slc.transpose(1, 2))  # [B, >= max_len, Hkv, Dk]
    v_slc = property(lambda self: self._v_slc.transpose(1, 2))
    k_win = property(lambda self: self._k_win.transpose(1, 2))  # [B, w, Hkv, Dk], slot p % w
    v_win = property(lambda self: self._v_win.transpose(1, 2))
    k_cmp = property(lambda self: self._k_cmp.transpose(1, 2))  # [B, Nmax, Hkv, Dk]
    v_cmp = property(lambda self: self._v_cmp.transpose(1, 2))
    k_tail = property(lambda self: self._k_tail[:, :, self._t0:self._t1].transpose(1, 2))  # [B, <= l-1, Hkv, Dk]
    v_tail = property(lambda self: self._v_tail[:, :, self._t0:self._t1].transpose(1, 2))

    # ------------------------------------------------------------------ state updates

    def window_state(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Ring contents ``k, v [B, w, Hkv, D]`` and the position held by each slot ``[w]`` (-1: empty)."""
        s, w = self.length, self.window
        slot = torch.arange(w, device=self.k_win.device)
        pos = (s - 1) - torch.remainder(s - 1 - slot, w)
        return self.k_win, self.v_win, torch.where(pos >= 0, pos, torch.full_like(pos, -1))

    def append(self, kv: dict[str, tuple[torch.Tensor, torch.Tensor]],
               compress: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
               compressed: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Add ``m`` new tokens. ``kv[branch] = (k [B,m,Hkv,Dk], v [B,m,Hkv,Dv])`` (keys RoPE'd, but the
        compressed branch's not under the layer's ``cmp_rope="block"``: its ``compress`` rotates each
        compressed key instead).

        ``compress(kb, vb)`` maps blocks ``[B, n, Hkv, l, D]`` to ``[B, n, Hkv, D]``
        (the layer's phi). ``compressed`` passes blocks the caller already built
        (prefill of an empty cache), so they are not recomputed.
        """
        k_new, v_new = kv["slc"]
        B, m = k_new.shape[:2]
        s, l, w = self.length, self.block_len, self.window
        if B != self.batch_size:
            raise ValueError(f"NSACache: batch of {B} rows, cache was built for {self.batch_size}")
        if s + m > self.max_len:
            raise ValueError(f"NSACache: {s} cached + {m} new tokens exceed max_len={self.max_len}")
        self._k_slc[:, :, s:s + m] = k_new.transpose(1, 2)
        self._v_slc[:, :, s:s + m] = v_new.transpose(1, 2)

        k_w, v_w = kv["win"]
        keep = min(m, w)
        if keep == 1:
            self._k_win[:, :, (s + m - 1) % w] = k_w[:, m - 1]
            self._v_win[:, :, (s + m - 1) % w] = v_w[:, m - 1]
        else:
            slots = torch.arange(s + m - keep, s + m, device=self._k_win.device) % w
            self._k_win[:, :, slots] = k_w[:, m - keep:].transpose(1, 2)
            self._v_win[:, :, slots] = v_w[:, m - keep:].transpose(1, 2)

        # the compressed branch's raw tokens since the oldest incomplete block, head-major
        k_c, v_c = kv["cmp"]
        k_c, v_c = k_c.transpose(1, 2).to(self._k_tail.dtype), v_c.transpose(1, 2).to(self._v_tail.dtype)
        if self._make_room(m):
            self._k_tail[:, :, self._t1:self._t1 + m] = k_c
            self._v_tail[:, :, self._t1:self._t1 + m] = v_c
            seq_k = self._k_tail[:, :, self._t0:self._t1 + m]
            seq_v = self._v_tail[:, :, self._t0:self._t1 + m]
        else:  # a long prefill: join tail and new tokens once
            seq_k = torch.cat((self._k_tail[:, :, self._t0:self._t1], k_c), 2)
            seq_v = torch.cat((self._v_tail[:, :, self._t0:self._t1], v_c), 2)
        self._add_compressed(seq_k, seq_v, s + m, compress, compressed)
        keep = min(l - 1, seq_k.shape[2])  # every incomplete block lies in the last l - 1 tokens
        if self._t1 + m <= self._k_tail.shape[2]:
            self._t1 += m
            self._t0 = self._t1 - keep
        else:
            for buf, seq in ((self._k_tail, seq_k), (self._v_tail, seq_v)):
                buf[:, :, :keep] = seq[:, :, seq.shape[2] - keep:]
            self._t0, self._t1 = 0, keep
        self.length = s + m

    def _make_room(self, m: int) -> bool:
        """Whether ``m`` new tokens fit in the tail buffer after ``_t1``, moving the tail to the front
        when that makes them fit."""
        room = self._k_tail.shape[2]
        if self._t1 + m > room and self._t1 - self._t0 + m <= room:
            n = self._t1 - self._t0
            for buf in (self._k_tail, self._v_tail):
                buf[:, :, :n] = buf[:, :, self._t0:self._t1].clone()
            self._t0, self._t1 = 0, n
        return self._t1 + m <= room

    def _add_compressed(self, seq_k, seq_v, end: int, compress, compressed=None) -> None:
        """Append the compressed entries of the blocks that end at or before token ``end - 1``, built by
        ``compress`` from the raw ``seq_k, seq_v [B, Hkv, n, D]`` (tokens ``end - n .. end - 1``)
        unless given as ``compressed``."""
        l, d = self.block_len, self.stride
        p0 = end - seq_k.shape[2]  # absolute position of seq[:, :, 0]
        n_total = (end - l) // d + 1 if end >= l else 0
        n_new = n_total - self.num_cmp
        if n_new <= 0:
            return
        if compressed is None:
            a = self.num_cmp * d - p0
            kb = seq_k[:, :, a:a + (n_new - 1) * d + l].unfold(2, l, d)  # [B, Hkv, n, D, l]
            vb = seq_v[:, :, a:a + (n_new - 1) * d + l].unfold(2, l, d)
            kc, vc = compress(kb.permute(0, 2, 1, 4, 3), vb.permute(0, 2, 1, 4, 3))  # blocks [B, n, Hkv, l, D]
        else:
            kc, vc = compressed
        if kc.shape[1] != n_new:
            raise ValueError(f"NSACache: got {kc.shape[1]} compressed blocks, expected {n_new}")
        self._k_cmp[:, :, self.num_cmp:n_total] = kc.transpose(1, 2)
        self._v_cmp[:, :, self.num_cmp:n_total] = vc.transpose(1, 2)
        self.num_cmp = n_total

    # one token written in place by a fused op (nsa.ops.decode_cpu): reserve_one, write, commit_one

    def reserve_one(self) -> tuple[int, int, int]:
        """Where one new token's K/V go: ``(s, s % w, tail row)`` in the selected, window and tail buffers."""
        s = self.length
        if s + 1 > self.max_len:
            raise ValueError(f"NSACache: {s} cached + 1 new tokens exceed max_len={self.max_len}")
        self._make_room(1)
        return s, s % self.window, self._t1

    def commit_one(self, compress: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Count the token written at :meth:`reserve_one`'s places; compress the block it completes, if any."""
        s, l = self.length, self.block_len
        if s + 1 >= l and (s + 1 - l) % self.stride == 0:
            tail = slice(self._t0, self._t1 + 1)
            self._add_compressed(self._k_tail[:, :, tail], self._v_tail[:, :, tail], s + 1, compress)
        self._t1 += 1
        self._t0 = max(self._t0, self._t1 - (l - 1))
        self.length = s + 1


# ---------------------------------------------------------------------- decode-time attention


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the last dim restricted to ``mask``; rows with no key give all-zero
    probabilities and ``lse = -inf`` (the spec's "no visible block" rule)."""
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, -1, keepdim=True)
    safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    p = torch.exp(scores - safe).masked_fill(~mask, 0.0)
    return p, lse


def decode_compressed(q: torch.Tensor, cache: NSACache, pos: torch.Tensor, scale: float):
    """``q [B,m,Hkv,G,Dk]`` float32 at positions ``pos [m]`` -> ``(o [B,m,Hkv,G,Dv], p [B,m,Hkv,G,N])``.

    Compressed block ``i`` is visible to ``t`` iff ``i*d + l - 1 <= t``.
    """
    N = cache.num_cmp
    k, v = cache.k_cmp[:, :N].float(), cache.v_cmp[:, :N].float()
    i = torch.arange(N, device=q.device)
    vis = (i[None] * cache.stride + cache.block_len - 1) <= pos[:, None]  # [m, N]
    scores = torch.einsum("bmhgd,bnhd->bmhgn", q, k) * scale
    p, _ = _masked_softmax(scores, vis[None, :, None, None])
    return torch.einsum("bmhgn,bnhd->bmhgd", p, v), p


def decode_select(p: torch.Tensor, cache: NSACache, pos: torch.Tensor, *, num_select: int, num_init: int,
                  num_local: int) -> torch.Tensor:
    """Top-n selection blocks ``[B, m, Hkv, n]`` int64 (ascending, -1 padding last) from the
    compressed probabilities ``p [B,m,Hkv,G,N]``, by the spec's rule (group sum, overlap
    weights, forced initial/local blocks, ties to the lower index)."""
    l, d, ls = cache.block_len, cache.stride, cache.select_len
    P = p.sum(3)  # group sum -> [B, m, Hkv, N]
    n_sel = -(-cache.length // ls)  # selection blocks up to the newest token (cache already extended)
    per, span = ls // d, l // d
    K = n_sel * per
    N = min(P.shape[-1], K)
    padded = P.new_zeros(*P.shape[:-1], K + span - 1)
    padded[..., span - 1:span - 1 + N] = P[..., :N]
    # S[j] = sum_{m<l'/d} sum_{u<l/d} P[(l'/d) j + m - u]
    S = padded.unfold(-1, span, 1).sum(-1).view(*P.shape[:-1], n_sel, per).sum(-1)
    j = torch.arange(n_sel, device=P.device)
    jt = (pos // ls)[:, None]  # [m, 1]
    causal = j[None] <= jt
    forced = causal & ((j[None] < num_init) | (j[None] > jt - num_local))
    pri = S.masked_fill(~causal[None, :, None], float("-inf"))
    pri = pri.masked_fill(forced[None, :, None], float("inf"))
    order = torch.sort(pri, dim=-1, descending=True, stable=True)
    k = min(num_select, n_sel)
    idx = torch.where(torch.isneginf(order.values[..., :k]), -1, order.indices[..., :k])
    idx = torch.sort(torch.where(idx < 0, n_sel, idx), dim=-1).values
    idx = torch.where(idx == n_sel, -1, idx)
    if k < num_select:
        idx = torch.cat((idx, idx.new_full((*idx.shape[:-1], num_select - k), -1)), -1)
    return idx


def decode_selected(q: torch.Tensor, cache: NSACache, pos: torch.Tensor, idx: torch.Tensor, scale: float):
    """Attention of ``q [B,m,Hkv,G,Dk]`` over the tokens ``s <= t`` of its selected blocks
    ``idx [B,m,Hkv,n]``, gathered from the raw cache -> ``[B,m,Hkv,G,Dv]``."""
    ls = cache.select_len
    B, m, Hkv = idx.shape[:3]
    tok = (idx[..., None] * ls + torch.arange(ls, device=idx.device)).flatten(-2)  # [B,m,Hkv,n*l']
    valid = (idx >= 0).repeat_interleave(ls, -1) & (tok <= pos[None, :, None, None])
    tok = tok.clamp(0, cache.length - 1)
    b = torch.arange(B, device=idx.device)[:, None, None, None]
    h = torch.arange(Hkv, device=idx.device)[None, None, :, None]
    k = cache.k_slc[b, tok, h].float()  # [B,m,Hkv,n*l',Dk]
    v = cache.v_slc[b, tok, h].float()
    scores = torch.einsum("bmhgd,bmhkd->bmhgk", q, k) * scale
    p, _ = _masked_softmax(scores, valid[:, :, :, None])
    return torch.einsum("bmhgk,bmhkd->bmhgd", p, v)


def decode_window(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kpos: torch.Tensor, pos: torch.Tensor,
                  window: int, scale: float):
    """Sliding-window attention of ``q [B,m,Hkv,G,Dk]`` at ``pos [m]`` over keys ``k, v [B,S,Hkv,D]``
    at positions ``kpos [S]`` (-1: empty): keys in ``[t - w + 1, t]`` -> ``[B,m,Hkv,G,Dv]``."""
    mask = (kpos[None] >= 0) & (kpos[None] <= pos[:, None]) & (kpos[None] > pos[:, None] - window)
    scores = torch.einsum("bmhgd,bshd->bmhgs", q, k.float()) * scale
    p, _ = _masked_softmax(scores, mask[None, :, None, None])
    return torch.einsum("bmhgs,bshd->bmhgd", p, v.float())


# ---------------------------------------------------------------------- one-token step


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, mask=None) -> torch.Tensor:
    """``q [B,Hkv,G,Dk]`` over ``k [B,Hkv,S,Dk]``, ``v [B,Hkv,S,Dv]`` (``mask [B|1,Hkv|1,1,S]`` bool) ->
    ``[B,Hkv,G,Dv]`` float32, one fused attention call over the cache's own buffers."""
    o = torch.nn.functional.scaled_dot_product_attention(q.to(k.dtype), k, v, attn_mask=mask, scale=scale)
    return o.float()


def decode_token(q: torch.Tensor, cache: NSACache, scale: float, *, num_select: int, num_init: int,
                 num_local: int, branches=BRANCHES) -> dict[str, torch.Tensor]:
    """The three branch outputs ``[B,Hkv,G,Dv]`` float32 of the newest token (``q [B,Hkv,G,Dk]``,
    position ``t = cache.length - 1``; the cache already holds its K/V). Same rules as the
    ``decode_*`` functions, for one token: every cached compressed entry is visible, the ring
    holds exactly its window once ``t >= w - 1``, and each step reads only the ``N`` compressed
    entries, ``n`` selected blocks and ``w`` window slots, in place."""
    out = {}
    t, w, ls = cache.length - 1, cache.window, cache.select_len
    if "win" in branches:
        n = min(t + 1, w)  # before the ring is full, position p is in slot p
        out["win"] = _attend(q, cache._k_win[:, :, :n], cache._v_win[:, :, :n], scale)
    if "cmp" not in branches and "slc" not in branches:
        return out
    B, Hkv, G, _ = q.shape
    N = cache.num_cmp  # every complete block ends at or before t
    if N:
        kc, vc = cache._k_cmp[:, :, :N], cache._v_cmp[:, :, :N]
        p = torch.softmax((q.to(kc.dtype) @ kc.transpose(-1, -2)).float() * scale, -1)  # [B,Hkv,G,N]
        out["cmp"] = (p.to(vc.dtype) @ vc).float()
    else:  # no complete block yet: the spec's zero output
        p = q.new_zeros(B, Hkv, G, 0)
        out["cmp"] = q.new_zeros(B, Hkv, G, cache._v_cmp.shape[-1])
    if "slc" not in branches:
        return out
    # selection scores (NSA_SPEC.md): group sum, then S[j] = sum_{m<l'/d} sum_{u<l/d} P[(l'/d) j + m - u]
    per, span = ls // cache.stride, cache.block_len // cache.stride
    n_sel = t // ls + 1
    P = p.sum(2)  # [B, Hkv, N]
    K = n_sel * per
    Nk = min(N, K)
    padded = P.new_zeros(B, Hkv, K + span - 1)
    padded[..., span - 1:span - 1 + Nk] = P[..., :Nk]
    S = padded.unfold(-1, span, 1).sum(-1).view(B, Hkv, n_sel, per).sum(-1)
    # forced blocks: the first num_init and the num_local up to the current one; ties to the lower index
    S[..., :num_init] = float("inf")
    S[..., max(0, n_sel - num_local):] = float("inf")
    k = min(num_select, n_sel)
    # top-k with ties to the lower j, exactly: S >= 0, so its float32 bits order like its values; the
    # int64 key bits(S) * 2^32 + (n_sel - 1 - j) is unique and orders by S, then by lower j
    # (one topk instead of a stable sort of all n_sel blocks)
    tie = torch.arange(n_sel - 1, -1, -1, device=S.device)
    key = S.float().view(torch.int32).to(torch.int64).bitwise_left_shift_(32).add_(tie)
    idx = key.topk(k, dim=-1, sorted=False).indices.sort(dim=-1).values
    # gather the k blocks of every (row, head) with one index_select on the [B*Hkv*blocks, l', D] view
    n_blk = cache._k_slc.shape[2] // ls
    flat = (idx + (torch.arange(B * Hkv, device=q.device) * n_blk).view(B, Hkv, 1)).flatten()
    ks = cache._k_slc.view(-1, ls, cache._k_slc.shape[-1]).index_select(0, flat).view(B, Hkv, k * ls, -1)
    vs = cache._v_slc.view(-1, ls, cache._v_slc.shape[-1]).index_select(0, flat).view(B, Hkv, k * ls, -1)
    mask = None
    if (t + 1) % ls:  # the current block (always selected: it is the last local one) is partly in the future
        tok = (idx[..., None] * ls + torch.arange(ls, device=q.device)).flatten(2)
        mask = (tok <= t)[:, :, None]
    out["slc"] = _attend(q, ks, vs, scale, mask)
    return out
