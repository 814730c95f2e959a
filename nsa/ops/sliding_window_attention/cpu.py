"""Sliding-window attention on the fused CPU op (:mod:`nsa.ops.attention_cpu`): CPU float32;
other inputs go to the torch reference."""

from __future__ import annotations

from nsa.ops import attention_cpu
from nsa.ops.common import per_document, resolve_scale
from nsa.ops.sliding_window_attention import reference


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]`` -> ``o [B,T,H,Dv]``.
    With ``cu_seqlens`` (B == 1) the window never reaches across a document start."""
    if not attention_cpu.applies(q):
        return reference.sliding_window_attention(q, k, v, window=window, scale=scale, cu_seqlens=cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])
    if cu_seqlens is None:
        return attention_cpu.window_attention(q, k, v, window, scale)
    return per_document(lambda qd, kd, vd: attention_cpu.window_attention(qd, kd, vd, window, scale), cu_seqlens,
                        q, k, v)
