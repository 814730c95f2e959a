"""Native Sparse Attention (NSA): the functional API.

Tensors are ``[B, T, H, D]``; indices and semantics follow NSA_SPEC.md. Each function
validates its inputs once (``ValueError`` naming the problem), then dispatches to a backend:
``"torch"`` (``nsa.ops.<op>.reference``, chunked PyTorch, the readable oracle), ``"cpu"``
(``nsa.ops.<op>.cpu``: fused C++ ops for float32 on CPU, built at first use, forward and backward)
or ``"triton"`` (``nsa.ops.<op>.triton``, imported only when used). ``backend=None`` picks triton
for CUDA tensors, cpu for CPU float32 tensors (when the ops could be built; ``NSA_CPU_KERNEL=0``
turns that off) and torch otherwise. Backends receive the same keyword arguments, with ``scale``
already resolved to a float.

    o, lse = compressed_attention(q, k_cmp, v_cmp, block_len=, stride=)
    idx    = select_blocks(q, k_cmp, block_len=, stride=, select_len=, num_select=)
    o      = selected_attention(q, k, v, idx, select_len=)
    o      = sliding_window_attention(q, k, v, window=)
    cu_cmp = compressed_cu_seqlens(cu_seqlens, block_len, stride)

    o, lse, idx = compressed_attention_and_select(q, k_cmp, v_cmp, block_len=, stride=, select_len=,
                                                  num_select=)   # the first two in one pass
    o, idx = native_sparse_attention(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=,
                                     stride=, select_len=, num_select=, window=)  # all three, gated
"""

from __future__ import annotations

import torch

from nsa.ops import common as _c
from nsa.ops.common import compressed_cu_seqlens

__all__ = [
    "compressed_attention",
    "select_blocks",
    "selected_attention",
    "sliding_window_attention",
    "compressed_cu_seqlens",
    "compressed_attention_and_select",
    "native_sparse_attention",
]


def compressed_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    *,
    block_len: int,
    stride: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query over the compressed blocks it can see (block ``i`` covers
    ``[i*d, i*d+l)``, visible to ``t`` iff ``i*d + l - 1 <= t``).

    ``q [B,T,H,Dk]``, ``k_cmp [B,Nc,Hkv,Dk]``, ``v_cmp [B,Nc,Hkv,Dv]`` with
    ``Nc = floor((T-l)/d) + 1`` (or 0; per document with ``cu_seqlens``, packed at
    :func:`compressed_cu_seqlens` offsets). Returns ``o [B,T,H,Dv]`` (0 where no block is
    visible) and ``lse [B,T,H]`` float32 (``-inf`` there).
    """
    _c.check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    _c.check_block_params(block_len, stride)
    _c.check_scale(scale)
    _c.check_cu_seqlens(cu_seqlens, q)
    _c.check_compressed_len(q, k_cmp, block_len, stride, cu_seqlens)
    fn = _c.backend_fn("compressed_attention", _c.resolve_backend(backend, q))
    return fn(
        q,
        k_cmp,
        v_cmp,
        block_len=block_len,
        stride=stride,
        scale=_c.resolve_scale(scale, q.shape[-1]),
        cu_seqlens=cu_seqlens,
    )


def _check_selection_inputs(q, k_cmp, v_cmp, block_len, stride, select_len, num_select, num_init, num_local, scale,
                            cu_seqlens) -> None:
    """The checks :func:`select_blocks` and :func:`compressed_attention_and_select` share
    (``v_cmp`` may be None)."""
    _c.check_qkv(q, k_cmp, v_cmp, "k_cmp", "v_cmp")
    _c.check_block_params(block_len, stride, select_len)
    _c.check_selection_params(num_select, num_init, num_local)
    _c.check_scale(scale)
    _c.check_cu_seqlens(cu_seqlens, q)
    _c.check_compressed_len(q, k_cmp, block_len, stride, cu_seqlens)


def select_blocks(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    *,
    block_len: int,
    stride: int,
    select_len: int,
    num_select: int,
    num_init: int = 1,
    num_local: int = 2,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    lse: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``num_select`` selection blocks per query and KV group.

    Scores: compressed probabilities summed over the group's heads, overlap-weighted onto
    selection blocks ``[j*l', (j+1)*l')``; the ``num_init`` first and ``num_local`` most recent
    causal blocks are always taken, the rest by score (ties to the lower index). Returns int32
    ``[B,T,Hkv,num_select]``, ascending, ``-1`` padding last. ``lse [B,T,H]`` (optional) is
    ``compressed_attention``'s, reused to recover probabilities; the result is the same.
    """
    _check_selection_inputs(q, k_cmp, None, block_len, stride, select_len, num_select, num_init, num_local, scale,
                            cu_seqlens)
    _c.check_lse(q, lse)
    fn = _c.backend_fn("select_blocks", _c.resolve_backend(backend, q))
    return fn(
        q,
        k_cmp,
        block_len=block_len,
        stride=stride,
        select_len=select_len,
        num_select=num_select,
        num_init=num_init,
        num_local=num_local,
        scale=_c.resolve_scale(scale, q.shape[-1]),
        cu_seqlens=cu_seqlens,
        lse=lse,
    )


def selected_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_indices: torch.Tensor,
    *,
    select_len: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Each head of a KV group at ``t`` attends to the tokens ``s <= t`` of the union of the
    group's selected blocks ``block_indices [B,T,Hkv,n]`` (``-1`` ignored); 0 if none.

    ``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]`` -> ``o [B,T,H,Dv]``.
    """
    _c.check_qkv(q, k, v)
    _c.check_same_length(q, k, "k")
    _c.check_int_param("select_len", select_len)
    _c.check_block_indices(q, k, block_indices)
    _c.check_scale(scale)
    _c.check_cu_seqlens(cu_seqlens, q)
    fn = _c.backend_fn("selected_attention", _c.resolve_backend(backend, q))
    return fn(
        q,
        k,
        v,
        block_indices,
        select_len=select_len,
        scale=_c.resolve_scale(scale, q.shape[-1]),
        cu_seqlens=cu_seqlens,
    )


def sliding_window_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    window: int,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Causal attention of query ``t`` over tokens ``[max(0, t-w+1), t]`` (``w`` incl. itself).

    ``q [B,T,H,Dk]``, ``k [B,T,Hkv,Dk]``, ``v [B,T,Hkv,Dv]`` -> ``o [B,T,H,Dv]``.
    """
    _c.check_qkv(q, k, v)
    _c.check_same_length(q, k, "k")
    _c.check_int_param("window", window)
    _c.check_scale(scale)
    _c.check_cu_seqlens(cu_seqlens, q)
    fn = _c.backend_fn("sliding_window_attention", _c.resolve_backend(backend, q))
    return fn(q, k, v, window=window, scale=_c.resolve_scale(scale, q.shape[-1]), cu_seqlens=cu_seqlens)


def compressed_attention_and_select(
    q: torch.Tensor,
    k_cmp: torch.Tensor,
    v_cmp: torch.Tensor,
    *,
    block_len: int,
    stride: int,
    select_len: int,
    num_select: int,
    num_init: int = 1,
    num_local: int = 2,
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`compressed_attention` followed by :func:`select_blocks` (from its ``lse``), fused
    where the backend can: the torch backend selects from the attention's own softmax in the
    same pass over ``q . k_cmp``, so the compressed scores are computed once, not twice.

    Returns ``(o [B,T,H,Dv], lse [B,T,H], idx [B,T,Hkv,num_select] int32)``, the same as the
    two calls (the probabilities are rounded differently, so blocks whose scores tie to the
    last bit may differ, as they may between backends). Only ``o`` and ``lse`` carry gradients.
    """
    _check_selection_inputs(q, k_cmp, v_cmp, block_len, stride, select_len, num_select, num_init, num_local, scale,
                            cu_seqlens)
    fn = _c.backend_fn("select_blocks", _c.resolve_backend(backend, q), "compressed_attention_and_select")
    return fn(
        q,
        k_cmp,
        v_cmp,
        block_len=block_len,
        stride=stride,
        select_len=select_len,
        num_select=num_select,
        num_init=num_init,
        num_local=num_local,
        scale=_c.resolve_scale(scale, q.shape[-1]),
        cu_seqlens=cu_seqlens,
    )


def native_sparse_attention(
    q: torch.Tensor,
    k_cmp: torch.Tensor | None,
    v_cmp: torch.Tensor | None,
    k_slc: torch.Tensor | None,
    v_slc: torch.Tensor | None,
    k_win: torch.Tensor | None,
    v_win: torch.Tensor | None,
    gates: torch.Tensor | None = None,
    *,
    block_len: int,
    stride: int,
    select_len: int,
    num_select: int,
    window: int,
    num_init: int = 1,
    num_local: int = 2,
    branches: tuple[str, ...] = ("cmp", "slc", "win"),
    scale: float | None = None,
    cu_seqlens: torch.Tensor | None = None,
    backend: str | None = None,
    return_selection: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """NSA's attention output: ``o = sum_c g_c * o_c`` over the ``branches`` that are on (compressed
    ``"cmp"``, selected ``"slc"``, sliding window ``"win"``), the selected branch attending to the
    blocks the compressed branch's probabilities pick (:func:`compressed_attention_and_select`).

    ``q [B,T,H,Dk]``; compressed ``k_cmp [B,Nc,Hkv,Dk]``, ``v_cmp``; raw ``k_slc, k_win [B,T,Hkv,Dk]``,
    ``v_slc, v_win [B,T,Hkv,Dv]`` (the same tensors when the branches share K/V; None for a branch
    that is off, the compressed pair also needed when only "slc" is on); ``gates [B,T,H,3]`` (cmp, slc,
    win; None: all 1). Returns ``(o [B,T,H,Dv] in the gates' dtype, idx [B,T,Hkv,num_select] int32 or
    None without "slc" or with ``return_selection`` False)``. The "torch" and "triton" backends compose
    the branch ops; "cpu" runs it as one fused op that keeps no per-branch outputs, nor (without
    ``return_selection``) the selection: its backward selects again.
    """
    if not branches or any(b not in ("cmp", "slc", "win") for b in branches):
        raise ValueError(f"branches must be a non-empty subset of ('cmp', 'slc', 'win'), got {branches!r}")
    if "cmp" in branches or "slc" in branches:
        _check_selection_inputs(q, k_cmp, v_cmp, block_len, stride, select_len, num_select, num_init, num_local,
                                scale, cu_seqlens)
    for name, (k, v) in (("slc", (k_slc, v_slc)), ("win", (k_win, v_win))):
        if name in branches:
            if k is None or v is None:
                raise ValueError(f"branch {name!r} is on but its k or v is None")
            _c.check_qkv(q, k, v, f"k_{name}", f"v_{name}")
            _c.check_same_length(q, k, f"k_{name}")
    if "slc" in branches or "win" in branches:
        vs = [v for b, v in (("cmp", v_cmp), ("slc", v_slc), ("win", v_win)) if b in branches and v is not None]
        if len({v.shape[-1] for v in vs}) > 1:
            raise ValueError("the branches' value head dims differ")
    if "win" in branches:
        _c.check_int_param("window", window)
    _c.check_scale(scale)
    _c.check_cu_seqlens(cu_seqlens, q)
    if gates is not None and (gates.dim() != 4 or tuple(gates.shape) != (*q.shape[:3], 3)):
        raise ValueError(f"gates must be [B, T, H, 3] = {(*q.shape[:3], 3)}, got {tuple(gates.shape)}")
    fn = _c.backend_fn("native_sparse_attention", _c.resolve_backend(backend, q))
    return fn(q, k_cmp, v_cmp, k_slc, v_slc, k_win, v_win, gates, block_len=block_len, stride=stride,
              select_len=select_len, num_select=num_select, num_init=num_init, num_local=num_local, window=window,
              branches=tuple(branches), scale=_c.resolve_scale(scale, q.shape[-1]), cu_seqlens=cu_seqlens,
              return_selection=return_selection)
