"""Compressed attention on the fused CPU op (:mod:`nsa.ops.attention_cpu`): CPU float32; other
inputs go to the torch reference."""

from __future__ import annotations

from nsa.ops import attention_cpu
from nsa.ops.common import compressed_cu_seqlens, per_document, resolve_scale
from nsa.ops.compressed_attention import reference


def compressed_attention(q, k_cmp, v_cmp, *, block_len, stride, scale=None, cu_seqlens=None):
    """``q [B,T,H,Dk]``, ``k_cmp [B,Nc,Hkv,Dk]``, ``v_cmp [B,Nc,Hkv,Dv]`` ->
    ``(o [B,T,H,Dv], lse [B,T,H] float32)``; ``cu_seqlens`` as in the reference."""
    if not attention_cpu.applies(q):
        return reference.compressed_attention(q, k_cmp, v_cmp, block_len=block_len, stride=stride, scale=scale,
                                              cu_seqlens=cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])

    def run(qd, kd, vd):
        return attention_cpu.compressed_attention(qd, kd, vd, block_len, stride, scale)

    if cu_seqlens is None:
        return run(q, k_cmp, v_cmp)
    return per_document(run, cu_seqlens, q, k_cmp, v_cmp,
                        cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride), cmp_index=(1, 2))
