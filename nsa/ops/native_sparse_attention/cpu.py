"""NSA's output in one fused CPU op (:class:`nsa.ops.attention_cpu.NativeSparseAttention`): per
query and KV head the compressed branch (and the block selection from its probabilities), the
selected and the window branch, gated and summed, with no per-branch output tensors in between
(forward and backward). CPU float32 (gates too); other inputs go to the composition of the
torch reference ops."""

from __future__ import annotations

import torch

from nsa.ops import attention_cpu
from nsa.ops.common import BRANCHES, compressed_cu_seqlens, per_document
from nsa.ops.native_sparse_attention.reference import compose


def native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, *, block_len, stride, select_len,
                            num_select, num_init, num_local, window, branches, scale, cu_seqlens,
                            return_selection=True):
    args = dict(block_len=block_len, stride=stride, select_len=select_len, num_select=num_select, num_init=num_init,
                num_local=num_local, window=window, scale=scale)
    if not attention_cpu.applies(q) or (gates is not None and gates.dtype is not torch.float32):
        return compose(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, branches=branches, cu_seqlens=cu_seqlens,
                       backend="torch", return_selection=return_selection, **args)
    on = tuple(b in branches for b in BRANCHES)
    keep = return_selection and on[1]
    tensors = [q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates]
    present = [i for i, x in enumerate(tensors) if x is not None]

    def run(*xs):
        full = [None] * len(tensors)
        for i, x in zip(present, xs, strict=True):
            full[i] = x
        o, idx = attention_cpu.native_sparse_attention(*full, on, **args, return_selection=keep)
        return (o, idx) if keep else o

    if cu_seqlens is None:
        out = run(*(tensors[i] for i in present))
    else:
        cmp = [j for j, i in enumerate(present) if i in (1, 2)]
        out = per_document(run, cu_seqlens, *(tensors[i] for i in present),
                           cmp_cu_seqlens=compressed_cu_seqlens(cu_seqlens, block_len, stride), cmp_index=tuple(cmp))
    return out if keep else (out, None)
