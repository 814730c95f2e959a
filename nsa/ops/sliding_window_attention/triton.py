"""Triton sliding-window attention (NSA branch 3), forward and backward.

Query ``t`` attends to tokens ``s`` in ``[max(0, t - window + 1), t]``. This is the banded
attention of ``nsa.ops.compressed_attention.triton`` with one key per token
(``stride = block_len = 1``): the same GQA-packed tiles, split backward and
int64 addressing; only the key tiles inside the window are visited. Written for
``Dk != Dv`` (192/128 in the paper), which the flash-attn package does not support.
"""

from typing import Optional

import torch

from nsa.ops.compressed_attention.triton import band_attention_backward, band_attention_forward
from nsa.ops.triton_utils import batch_cu_seqlens, interpreter_upcast, max_seqlen


def _docs(q, cu_seqlens):
    """``(cu, max_len)``: documents of q (and k, which shares the token layout)."""
    if cu_seqlens is None:
        B, T = q.shape[:2]
        return batch_cu_seqlens(B, T, q.device), T
    cu = cu_seqlens.to(device=q.device, dtype=torch.int32)
    return cu, max_seqlen(cu)


@torch.library.custom_op("nsa::sliding_window_attention", mutates_args=())
def _sliding_window_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                       window: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    dtype = q.dtype
    q, k, v = interpreter_upcast(q, k, v)
    cu, max_len = _docs(q, cu_seqlens)
    o, lse = band_attention_forward(q, k, v, cu, cu, max_len, max_len, 1, 1, window, scale)
    return o.to(dtype), lse


@_sliding_window_op.register_fake
def _(q, k, v, cu_seqlens, window, scale):
    return q.new_empty(*q.shape[:-1], v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


@torch.library.custom_op("nsa::sliding_window_attention_backward", mutates_args=())
def _sliding_window_bwd_op(do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                           lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], window: int,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    dtypes = (q.dtype, k.dtype, v.dtype)
    do, q, k, v, o = interpreter_upcast(do, q, k, v, o)
    cu, max_len = _docs(q, cu_seqlens)
    grads = band_attention_backward(do, q, k, v, o, lse, None, cu, cu, max_len, max_len, 1, 1, window, scale)
    return tuple(g.to(dt) for g, dt in zip(grads, dtypes, strict=True))


@_sliding_window_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, window, scale):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup(ctx, inputs, output):
    q, k, v, cu_seqlens, window, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], cu_seqlens)
    ctx.args = (window, scale)


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _sliding_window_bwd_op(do.contiguous(), q, k, v, o, lse, cu_seqlens, *ctx.args)
    return dq, dk, dv, None, None, None


_sliding_window_op.register_autograd(_backward, setup_context=_setup)


def sliding_window_attention(q, k, v, *, window, scale=None, cu_seqlens=None):
    """Attention of query ``t`` over keys ``s`` with ``t - window < s <= t`` (same document).

    q ``[B, T, H, Dk]``, k ``[B, T, Hkv, Dk]``, v ``[B, T, Hkv, Dv]`` (``B == 1`` with
    ``cu_seqlens``). Returns o ``[B, T, H, Dv]``; differentiable in q, k, v.
    """
    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return _sliding_window_op(q, k, v, cu_seqlens, int(window), scale)[0]
