"""Block selection with the fused CPU op (:mod:`nsa.ops.attention_cpu`): the compressed branch's
forward picks the blocks from its own probabilities (``compressed_attention_and_select``); the
stand-alone :func:`select_blocks` is the torch reference's. CPU float32; other inputs go to the
torch reference."""

from __future__ import annotations

from nsa.ops import attention_cpu
from nsa.ops.common import compressed_cu_seqlens, per_document, resolve_scale
from nsa.ops.select_blocks import reference
from nsa.ops.select_blocks.reference import select_blocks  # noqa: F401  (the backend's select_blocks)


def compressed_attention_and_select(q, k_cmp, v_cmp, *, block_len, stride, select_len, num_select, num_init=1,
                                    num_local=2, scale=None, cu_seqlens=None):
    """``(o [B,T,H,Dv], lse [B,T,H], idx [B,T,Hkv,n] int32)``, as the reference's."""
    if not attention_cpu.applies(q):
        return reference.compressed_attention_and_select(
            q, k_cmp, v_cmp, block_len=block_len, stride=stride, select_len=select_len, num_select=num_select,
            num_init=num_init, num_local=num_local, scale=scale, cu_seqlens=cu_seqlens)
    scale = resolve_scale(scale, q.shape[-1])
    select = (select_len, num_select, num_init, num_local)

    def run(qd, kd, vd):
        return attention_cpu.compressed_attention(qd, kd, vd, block_len, stride, scale, select)

    if cu_seqlens is None:
        return run(q, k_cmp, v_cmp)
    return per_document(run, cu_seqlens, q, k_cmp, v_cmp,
                        cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride), cmp_index=(1, 2))
