"""Shared helpers for the NSA ops: input validation, backend resolution, varlen helpers.

The public API in ``nsa/__init__.py`` validates its inputs once with the
``check_*`` functions here and then dispatches to a backend module
``nsa.ops.<op>.reference`` ("torch"), ``nsa.ops.<op>.cpu`` ("cpu": the fused CPU ops for
float32, :mod:`nsa.ops.attention_cpu`) or ``nsa.ops.<op>.triton`` ("triton").
Every check raises ``ValueError`` naming the offending argument.
"""

from __future__ import annotations

import importlib

import torch

BACKENDS = ("torch", "cpu", "triton")
BRANCHES = ("cmp", "slc", "win")  # compressed, selected, sliding window: the gate order
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_BACKEND_MODULE = {"torch": "reference", "cpu": "cpu", "triton": "triton"}


# ----------------------------------------------------------------------------- backends


def resolve_backend(backend: str | None, x: torch.Tensor) -> str:
    """``None`` -> "triton" for CUDA tensors, "cpu" (the fused CPU ops) for CPU float32 tensors when
    they are built and not switched off (``NSA_CPU_KERNEL=0``), "torch" otherwise; unknown names ->
    ValueError."""
    if backend is None:
        if x.is_cuda:
            return "triton"
        from nsa.ops import attention_cpu

        return "cpu" if attention_cpu.default_for(x) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS} or None, got {backend!r}")
    return backend


def backend_fn(op: str, backend: str, name: str | None = None):
    """The function ``nsa.ops.<op>.<reference|cpu|triton>.<name or op>``, imported lazily."""
    module = importlib.import_module(f"nsa.ops.{op}.{_BACKEND_MODULE[backend]}")
    return getattr(module, name or op)


# ----------------------------------------------------------------------------- small helpers


def resolve_scale(scale: float | None, head_dim: int) -> float:
    """Softmax scale: ``head_dim ** -0.5`` unless given."""
    return float(head_dim) ** -0.5 if scale is None else float(scale)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64 (for gradcheck), everything else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def num_compressed(length: int, block_len: int, stride: int) -> int:
    """Number of complete compressed blocks in a sequence: floor((len - l)/d) + 1, or 0."""
    return (length - block_len) // stride + 1 if length >= block_len else 0


def num_select_blocks(length: int, select_len: int) -> int:
    """Number of selection blocks (the last may be partial): ceil(len / l')."""
    return -(-length // select_len)


def doc_bounds(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    """``[(start, end), ...]`` per document from int32 ``cu_seqlens [N+1]``."""
    cu = cu_seqlens.tolist()
    return list(zip(cu[:-1], cu[1:], strict=True))


def compressed_cu_seqlens(cu_seqlens: torch.Tensor, block_len: int, stride: int) -> torch.Tensor:
    """Offsets of each document's compressed blocks in the packed ``k_cmp``/``v_cmp``.

    ``cu_seqlens`` int32 ``[N+1]`` -> int32 ``[N+1]`` with ``out[i+1] - out[i] = Nc(len_i)``,
    ``Nc(len) = floor((len - l)/d) + 1`` (0 for documents shorter than one block).
    """
    check_cu_seqlens(cu_seqlens, None)
    check_block_params(block_len, stride)
    lens = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    n = torch.where(lens >= block_len, torch.div(lens - block_len, stride, rounding_mode="floor") + 1, 0)
    out = torch.zeros(cu_seqlens.numel(), dtype=torch.int32, device=cu_seqlens.device)
    out[1:] = torch.cumsum(n, 0).to(torch.int32)
    return out


def chunk_ranges(total: int, chunk: int):
    """``(start, end)`` pairs covering ``range(total)`` in steps of ``chunk``."""
    return ((s, min(s + chunk, total)) for s in range(0, total, chunk))


SCORE_BUDGET = 1 << 20  # elements of one chunk's score block: 1M floats = 4 MB, about cache-sized


def chunk_size(rows_per_query: int, keys: int, budget: int | None = None, multiple: int = 1) -> int:
    """Queries per chunk so that a ``[chunk * rows_per_query, keys]`` score block has about
    ``budget`` elements (``SCORE_BUDGET`` by default: small enough that the elementwise softmax
    passes run in cache); a multiple of ``multiple``, at least one."""
    budget = SCORE_BUDGET if budget is None else budget
    c = max(1, budget // max(1, rows_per_query * max(1, keys)))
    return max(multiple, c // multiple * multiple)


# ----------------------------------------------------------------------------- validation


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def check_int_param(name: str, value) -> None:
    """A positive int setting such as ``window`` or ``select_len``."""
    _check_int(name, value, 1)


def check_block_params(block_len: int, stride: int, select_len: int | None = None) -> None:
    """``l, d >= 1`` with ``d | l``; with ``l'``: ``d | l'`` and ``l <= l'``."""
    _check_int("block_len", block_len, 1)
    _check_int("stride", stride, 1)
    if block_len % stride:
        raise ValueError(f"stride ({stride}) must divide block_len ({block_len})")
    if select_len is not None:
        _check_int("select_len", select_len, 1)
        if select_len % stride:
            raise ValueError(f"stride ({stride}) must divide select_len ({select_len})")
        if block_len > select_len:
            raise ValueError(f"block_len ({block_len}) must be <= select_len ({select_len})")


def check_scale(scale) -> None:
    if scale is not None and (
        isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale > 0
    ):
        raise ValueError(f"scale must be a positive float or None, got {scale!r}")


def _check_4d(name: str, x) -> None:
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(f"{name} must have 4 dims [B, T, H, D], got shape {tuple(x.shape)}")


def check_qkv(q, k, v, k_name: str = "k", v_name: str = "v") -> None:
    """``q [B,T,H,Dk]``, ``k [B,S,Hkv,Dk]``, ``v [B,S,Hkv,Dv]``: same float dtype and device,
    ``H % Hkv == 0``. ``S`` is ``T`` for raw keys and ``Nc`` for compressed ones (checked by caller)."""
    _check_4d("q", q)
    _check_4d(k_name, k)
    if v is not None:
        _check_4d(v_name, v)
    tensors = [("q", q), (k_name, k)] + ([(v_name, v)] if v is not None else [])
    for name, x in tensors:
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{name} must be float32, float16, bfloat16 (or float64), got {x.dtype}")
        if x.dtype != q.dtype:
            raise ValueError(f"{name} dtype {x.dtype} differs from q dtype {q.dtype}")
        if x.device != q.device:
            raise ValueError(f"{name} is on {x.device} but q is on {q.device}")
    B, _, H, Dk = q.shape
    if k.shape[0] != B:
        raise ValueError(f"{k_name} batch {k.shape[0]} differs from q batch {B}")
    if k.shape[3] != Dk:
        raise ValueError(f"{k_name} head dim {k.shape[3]} differs from q head dim {Dk}")
    Hkv = k.shape[2]
    if Hkv == 0 or H % Hkv:
        raise ValueError(f"q heads ({H}) must be a multiple of {k_name} heads ({Hkv})")
    if v is not None and v.shape[:3] != k.shape[:3]:
        raise ValueError(
            f"{v_name} shape {tuple(v.shape)} does not match {k_name} shape {tuple(k.shape)} in [B, T, H]"
        )


def check_same_length(q, k, k_name: str) -> None:
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"{k_name} length {k.shape[1]} differs from q length {q.shape[1]}")


def check_cu_seqlens(cu_seqlens, q) -> None:
    """int32 ``[N+1]``, starts at 0, non-decreasing, ends at ``T``; requires ``B == 1``."""
    if cu_seqlens is None:
        return
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError("cu_seqlens must be a 1-D int32 tensor [N+1] with N >= 1")
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0 or any(b < a for a, b in zip(cu[:-1], cu[1:], strict=True)):
        raise ValueError(f"cu_seqlens must start at 0 and be non-decreasing, got {cu}")
    if q is not None:
        if q.shape[0] != 1:
            raise ValueError(f"cu_seqlens requires batch size 1 (packed row), got B={q.shape[0]}")
        if cu[-1] != q.shape[1]:
            raise ValueError(f"cu_seqlens ends at {cu[-1]} but the packed length is {q.shape[1]}")


def check_compressed_len(q, k_cmp, block_len: int, stride: int, cu_seqlens) -> None:
    """``k_cmp`` holds exactly the complete compressed blocks (per document with cu_seqlens)."""
    if cu_seqlens is None:
        expected = num_compressed(q.shape[1], block_len, stride)
    else:
        expected = sum(num_compressed(e - s, block_len, stride) for s, e in doc_bounds(cu_seqlens))
    if k_cmp.shape[1] != expected:
        raise ValueError(
            f"k_cmp/v_cmp hold {k_cmp.shape[1]} compressed blocks, expected {expected} "
            f"(floor((len - block_len)/stride) + 1 per sequence)"
        )


def check_selection_params(num_select: int, num_init: int, num_local: int) -> None:
    _check_int("num_select", num_select, 1)
    _check_int("num_init", num_init, 0)
    _check_int("num_local", num_local, 0)
    if num_init + num_local > num_select:
        raise ValueError(
            f"num_init + num_local ({num_init} + {num_local}) must be <= num_select ({num_select})"
        )


def check_block_indices(q, k, block_indices) -> None:
    """``block_indices [B, T, Hkv, n]`` integer."""
    if not isinstance(block_indices, torch.Tensor) or block_indices.dim() != 4:
        raise ValueError("block_indices must be an integer tensor [B, T, Hkv, n]")
    if block_indices.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"block_indices must be int32 or int64, got {block_indices.dtype}")
    B, T, Hkv = k.shape[:3]
    if tuple(block_indices.shape[:3]) != (B, T, Hkv) or block_indices.shape[3] < 1:
        raise ValueError(
            f"block_indices shape {tuple(block_indices.shape)} must be [B={B}, T={T}, Hkv={Hkv}, n>=1]"
        )
    if block_indices.device != q.device:
        raise ValueError(f"block_indices is on {block_indices.device} but q is on {q.device}")


def check_lse(q, lse) -> None:
    """``lse [B, T, H]`` float32 from ``compressed_attention``."""
    if lse is None:
        return
    if not isinstance(lse, torch.Tensor) or tuple(lse.shape) != tuple(q.shape[:3]):
        raise ValueError(f"lse must be a tensor [B, T, H] = {tuple(q.shape[:3])}")
    if lse.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"lse must be float32, got {lse.dtype}")
    if lse.device != q.device:
        raise ValueError(f"lse is on {lse.device} but q is on {q.device}")


def neg_inf_safe(lse: torch.Tensor) -> torch.Tensor:
    """``lse`` with ``-inf`` (no visible key) replaced by 0, so ``exp(s - lse)`` of masked
    scores (``-inf``) is 0 instead of NaN."""
    return torch.where(torch.isinf(lse), torch.zeros((), dtype=lse.dtype, device=lse.device), lse)


# ----------------------------------------------------------------------------- layouts and varlen


def to_groups(x: torch.Tensor, num_kv_heads: int, dtype: torch.dtype) -> torch.Tensor:
    """``[B, T, H, D]`` -> contiguous ``[B, Hkv, T, G, D]`` in ``dtype`` (heads of a group adjacent)."""
    B, T, H, D = x.shape
    return x.reshape(B, T, num_kv_heads, H // num_kv_heads, D).permute(0, 2, 1, 3, 4).to(dtype).contiguous()


def from_groups(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`to_groups` (without the dtype change): ``[B, Hkv, T, G, D]`` -> ``[B, T, H, D]``."""
    B, Hkv, T, G, D = x.shape
    return x.permute(0, 2, 1, 3, 4).reshape(B, T, Hkv * G, D)


def to_kv_heads(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, S, Hkv, D]`` -> contiguous ``[B, Hkv, S, D]`` in ``dtype``."""
    return x.permute(0, 2, 1, 3).to(dtype).contiguous()


def per_document(fn, cu_seqlens, *packed, cmp_cu_seqlens=None, cmp_index=()):
    """Run ``fn(*slices)`` on each document of a packed row and concatenate along T.

    ``packed`` tensors are ``[1, T, ...]`` sliced by ``cu_seqlens``; those whose position is in
    ``cmp_index`` are sliced by ``cmp_cu_seqlens`` (the packed compressed keys/values). ``fn``
    returns a tensor or a tuple of tensors ``[1, len, ...]``.
    """
    cmp_bounds = doc_bounds(cmp_cu_seqlens) if cmp_cu_seqlens is not None else None
    outs = []
    for i, (s, e) in enumerate(doc_bounds(cu_seqlens)):
        if e == s:
            continue  # an empty document adds nothing
        args = [
            x[:, cmp_bounds[i][0] : cmp_bounds[i][1]] if j in cmp_index else x[:, s:e]
            for j, x in enumerate(packed)
        ]
        outs.append(fn(*args))
    if not outs:  # T == 0
        return fn(*packed)
    if isinstance(outs[0], tuple):
        return tuple(torch.cat(parts, dim=1) for parts in zip(*outs, strict=True))
    return torch.cat(outs, dim=1)
