"""Selected attention on the fused CPU op (:mod:`nsa.ops.attention_cpu`): CPU float32; other
inputs go to the torch reference."""

from __future__ import annotations

from nsa.ops import attention_cpu
from nsa.ops.common import per_document, resolve_scale
from nsa.ops.selected_attention import reference


def selected_attention(q, k, v, block_indices, *, select_len, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]``, ``block_indices [B,T,Hkv,n]``
    -> ``o [B,T,H,Dv]``. With ``cu_seqlens`` (B == 1) indices are relative to each document."""
    if not attention_cpu.applies(q):
        return reference.selected_attention(q, k, v, block_indices, select_len=select_len, scale=scale,
                                            cu_seqlens=cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])

    def run(qd, kd, vd, bd):
        return attention_cpu.selected_attention(qd, kd, vd, bd, select_len, scale)

    return run(q, k, v, block_indices) if cu_seqlens is None else per_document(run, cu_seqlens, q, k, v,
                                                                               block_indices)
