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
would cost more than it saves.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

BRANCHES = ("cmp", "slc", "win")


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
        new = lambda n, d: torch.zeros(B, n, Hkv, d, device=device, dtype=dtype)
        n_cmp = (max_len - block_len) // stride + 1 if max_len >= block_len else 0
        self.k_slc, self.v_slc = new(max_len, Dk), new(max_len, Dv)
        self.k_win, self.v_win = new(window, Dk), new(window, Dv)
        self.k_tail, self.v_tail = new(0, Dk), new(0, Dv)
        self.k_cmp, self.v_cmp = new(n_cmp, Dk), new(n_cmp, Dv)
        self.num_cmp = 0

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
        """Add ``m`` new tokens. ``kv[branch] = (k [B,m,Hkv,Dk], v [B,m,Hkv,Dv])`` (keys RoPE'd).

        ``compress(kb, vb)`` maps blocks ``[B, n, Hkv, l, D]`` to ``[B, n, Hkv, D]``
        (the layer's phi). ``compressed`` passes blocks the caller already built
        (prefill of an empty cache), so they are not recomputed.
        """
        k_new, v_new = kv["slc"]
        B, m = k_new.shape[:2]
        s, l, d, w = self.length, self.block_len, self.stride, self.window
        if B != self.batch_size:
            raise ValueError(f"NSACache: batch of {B} rows, cache was built for {self.batch_size}")
        if s + m > self.max_len:
            raise ValueError(f"NSACache: {s} cached + {m} new tokens exceed max_len={self.max_len}")
        self.k_slc[:, s:s + m] = k_new
        self.v_slc[:, s:s + m] = v_new

        k_w, v_w = kv["win"]
        keep = min(m, w)
        slots = torch.arange(s + m - keep, s + m, device=self.k_win.device) % w
        self.k_win[:, slots] = k_w[:, m - keep:]
        self.v_win[:, slots] = v_w[:, m - keep:]

        k_c, v_c = kv["cmp"]
        seq_k = torch.cat((self.k_tail, k_c.to(self.k_tail.dtype)), 1)
        seq_v = torch.cat((self.v_tail, v_c.to(self.v_tail.dtype)), 1)
        p0 = s - self.k_tail.shape[1]  # absolute position of seq[:, 0]
        n_total = (s + m - l) // d + 1 if s + m >= l else 0
        n_new = n_total - self.num_cmp
        if n_new > 0:
            if compressed is None:
                a = self.num_cmp * d - p0
                kb = seq_k[:, a:a + (n_new - 1) * d + l].unfold(1, l, d)  # [B, n, Hkv, D, l]
                vb = seq_v[:, a:a + (n_new - 1) * d + l].unfold(1, l, d)
                compressed = compress(kb.transpose(-1, -2), vb.transpose(-1, -2))
            kc, vc = compressed
            if kc.shape[1] != n_new:
                raise ValueError(f"NSACache: got {kc.shape[1]} compressed blocks, expected {n_new}")
            self.k_cmp[:, self.num_cmp:n_total] = kc
            self.v_cmp[:, self.num_cmp:n_total] = vc
            self.num_cmp = n_total
        keep = min(l - 1, seq_k.shape[1])  # every incomplete block lies in the last l - 1 tokens
        self.k_tail = seq_k[:, seq_k.shape[1] - keep:].clone()
        self.v_tail = seq_v[:, seq_v.shape[1] - keep:].clone()
        self.length = s + m


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
