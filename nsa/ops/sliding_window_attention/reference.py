"""PyTorch reference for the sliding-window branch.

Query ``t`` attends to tokens ``s`` in ``[max(0, t - w + 1), t]`` (NSA_SPEC.md). Method: cut
the queries into chunks of ``C``; chunk ``c`` reads the ``C + w - 1`` keys that any of its
queries can see (a few more, see :func:`window_keys`) and masks the band per token. The chunks
(a group of them at a time, to bound memory) go through one
``torch.nn.functional.scaled_dot_product_attention`` call as a batch, so the dense per-chunk
work runs in PyTorch's fused attention kernel (flash attention on CPU, with native GQA),
forward and backward. Work is ``O(T * (w + C))``; memory is linear in ``T``: the gathered
key/value windows of one call stay under ``GATHER_BUDGET`` elements.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nsa.ops.common import acc_dtype, per_document, resolve_scale

# Keys gathered per SDPA call, in elements (rows x kv heads x head dim): bounds the copies of
# the overlapping key/value windows (each key appears in about (C + w) / C of them).
GATHER_BUDGET = 1 << 24


def window_chunk(window: int, T: int) -> int:
    """Queries per chunk: ``w / 4`` within ``[16, 256]`` (never above ``T``).

    A chunk scores ``C + w - 1`` keys for ``w`` useful ones, so a small ``C`` wastes little;
    a large one amortises the per-chunk work. Measured on one core, ``w = 512``, H = 16,
    Hkv = 2, T = 8k, forward / forward+backward: C = 64 0.25 / 0.78 s, 128 0.24 / 0.75 s,
    256 0.24 / 0.78 s (the former chunked-matmul reference: 0.40 / 1.08 s)."""
    return max(1, min(T, max(16, min(256, window // 4))))


def window_keys(C: int, w: int) -> int:
    """Keys per chunk window: the ``C + w - 1`` a chunk can see, rounded up to a multiple of 16
    (the extra leading keys are masked). Measured at 8k, ``w = 512``: 640 keys take 0.25 s
    forward against 0.29 s for 639 (the fused kernel vectorises whole key blocks)."""
    return -(-(C + w - 1) // 16) * 16


def window_chunk_mask(c0: int, c1: int, C: int, S: int, w: int, device) -> torch.Tensor:
    """bool ``[c1 - c0, 1, C, S]``: which keys of chunk ``c``'s window query ``i`` sees. The
    window's key ``j`` is token ``c*C - L + j`` with ``L = S - C`` leading keys, query ``i`` is
    token ``c*C + i``; visible iff ``0 <= (c*C + i) - (c*C - L + j) < w`` and the token
    exists (``>= 0``)."""
    L = S - C
    i = torch.arange(C, device=device)[:, None]
    j = torch.arange(S, device=device)[None, :]
    band = (j <= i + L) & (j > i + L - w)
    first = L - torch.arange(c0, c1, device=device)[:, None, None] * C  # the window's first real key
    return (band[None] & (j[None] >= first))[:, None]


def _window_dense(q, k, v, window, scale):
    B, T, H, Dk = q.shape
    Hkv, Dv = k.shape[2], v.shape[-1]
    if T == 0:
        return q.new_zeros(B, 0, H, Dv)
    acc = acc_dtype(q.dtype)
    w = min(window, T)  # no query reaches further back than the start
    C = window_chunk(w, T)
    n = -(-T // C)
    S = window_keys(C, w)
    # queries padded at the end to n*C; keys/values padded with S-C rows at the front (masked)
    qp = F.pad(q.to(acc), (0, 0, 0, 0, 0, n * C - T))
    kp = F.pad(k.to(acc), (0, 0, 0, 0, S - C, n * C - T))
    vp = F.pad(v.to(acc), (0, 0, 0, 0, S - C, n * C - T))
    per_call = max(1, GATHER_BUDGET // (B * S * Hkv * max(Dk, Dv)))
    outs = []
    for c0 in range(0, n, per_call):
        c1 = min(n, c0 + per_call)
        m = c1 - c0
        rows = (torch.arange(c0, c1, device=q.device)[:, None] * C + torch.arange(S, device=q.device)).view(-1)
        qc = qp[:, c0 * C : c1 * C].reshape(B * m, C, H, Dk).transpose(1, 2)
        kc = kp.index_select(1, rows).view(B * m, S, Hkv, Dk).transpose(1, 2)
        vc = vp.index_select(1, rows).view(B * m, S, Hkv, Dv).transpose(1, 2)
        mask = window_chunk_mask(c0, c1, C, S, w, q.device).expand(B, -1, -1, -1, -1).reshape(B * m, 1, C, S)
        o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=mask, scale=scale, enable_gqa=True)
        outs.append(o.transpose(1, 2).reshape(B, m * C, H, Dv))
    o = outs[0] if len(outs) == 1 else torch.cat(outs, 1)
    return o[:, :T].to(q.dtype)


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]`` -> ``o [B,T,H,Dv]``.
    With ``cu_seqlens`` (B == 1) the window never reaches across a document start."""
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return _window_dense(q, k, v, window, scale)
    return per_document(lambda qd, kd, vd: _window_dense(qd, kd, vd, window, scale), cu_seqlens, q, k, v)
