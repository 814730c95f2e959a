"""Small helpers shared by the NSA Triton kernels.

* Interpreter detection: with ``TRITON_INTERPRET=1`` kernels run on CPU tensors,
  ``@triton.autotune`` with several configs fails, and bfloat16 arithmetic is
  wrong (triton issue 11584), so kernels get one config and bf16 is upcast.
* Varlen helpers: every kernel works on documents packed into one row, described
  by ``cu_seqlens`` (int32 ``[N+1]``, flash-attn convention). A plain batch
  ``[B, T, ...]`` is the special case of ``B`` documents of length ``T``.
"""

from __future__ import annotations

import os

import torch
import triton

from nsa.ops.common import compressed_cu_seqlens  # re-exported: offsets of packed k_cmp per document

__all__ = [
    "is_interpreter",
    "select_configs",
    "interpreter_upcast",
    "dot_precision",
    "batch_cu_seqlens",
    "max_seqlen",
    "compressed_cu_seqlens",
    "next_pow2",
]


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def select_configs(gpu_configs: list, interpreter_config) -> list:
    """Autotune candidates: ``gpu_configs`` on a GPU, ``[interpreter_config]`` when interpreting.

    The interpreter cannot benchmark several configs, and small tiles keep it fast.
    """
    return [interpreter_config] if is_interpreter() else list(gpu_configs)


def interpreter_upcast(*tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Upcast bfloat16 tensors to float32 under the interpreter (its bf16 math is wrong).

    On a GPU (or for other dtypes) the tensors are returned unchanged.
    """
    if not is_interpreter():
        return tensors
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors)


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: exact ("ieee") for float32/64 inputs, else the default.

    float32 inputs are the accuracy path (tests, debugging), so TF32 is avoided there.
    """
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def next_pow2(n: int) -> int:
    """Smallest power of two >= ``max(n, 16)`` (``tl.dot`` needs tile dims >= 16)."""
    return max(16, triton.next_power_of_2(int(n)))


def batch_cu_seqlens(batch: int, seqlen: int, device: torch.device) -> torch.Tensor:
    """``cu_seqlens`` int32 ``[B+1]`` for ``B`` equal documents of length ``seqlen``."""
    return torch.arange(batch + 1, dtype=torch.int32, device=device) * seqlen


def max_seqlen(cu_seqlens: torch.Tensor) -> int:
    """Length of the longest document in ``cu_seqlens`` (host sync)."""
    if cu_seqlens.numel() < 2:
        return 0
    return int((cu_seqlens[1:] - cu_seqlens[:-1]).max().item())
