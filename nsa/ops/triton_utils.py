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
import triton.language as tl

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
    "doc_tiles",
    "split_dim",
    "load_rows",
    "load_split",
    "dot_nt",
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


# ---- tiling helpers shared by the selection and selected-attention kernels


def doc_tiles(cu_seqlens: torch.Tensor, total: int, block: int) -> torch.Tensor:
    """Tiles of ``block`` tokens that never straddle a document, int32 ``[P, 3]``.

    Row ``p`` is ``(doc, tile_start, doc_end)`` in flattened token coordinates; tiles of
    a document are consecutive and in order. ``P = total // block + N`` is a static upper
    bound on the tile count (no host sync); unused rows have ``tile_start == doc_end``.
    Also used by the selected-attention backward, where the tiles are selection blocks.
    """
    n_docs = cu_seqlens.numel() - 1
    cu = cu_seqlens.long()
    lens = cu[1:] - cu[:-1]
    ntiles = (lens + block - 1) // block
    cum = torch.cumsum(ntiles, 0)
    n_rows = total // block + n_docs
    pid = torch.arange(n_rows, device=cu.device)
    doc = torch.searchsorted(cum, pid, right=True)
    valid = doc < n_docs
    doc_c = doc.clamp(max=max(n_docs - 1, 0))
    first = cum[doc_c] - ntiles[doc_c]
    end = cu[doc_c + 1]
    start = torch.where(valid, cu[doc_c] + (pid - first) * block, end)
    return torch.stack([doc_c, start, end], 1).to(torch.int32).contiguous()


def split_dim(d: int) -> tuple[int, int]:
    """Head dim ``d`` as two power-of-two tiles ``(D1, D2)``, ``D1 + D2 >= d``, ``D2`` may be 0.

    192 -> (128, 64) instead of one 256 tile: 25% fewer padded MMA columns and registers.
    """
    p = triton.next_power_of_2(d)
    if p == d or d <= 16:
        return max(16, p), 0
    return p // 2, max(16, triton.next_power_of_2(d - p // 2))


@triton.jit
def load_rows(X, row_off, ok, offs_d, D):
    """Rows ``X[row_off + d]`` for ``d < D`` as ``[len(row_off), len(offs_d)]`` (0 outside)."""
    return tl.load(X + row_off[:, None] + offs_d[None, :], mask=ok[:, None] & (offs_d[None, :] < D), other=0.0)


@triton.jit
def load_split(X, row_off, ok, D: tl.constexpr, D1: tl.constexpr, D2: tl.constexpr):
    """Rows of a head dim ``D`` as two tiles: columns ``[0, D1)`` and ``[D1, D1 + D2)``."""
    a = load_rows(X, row_off, ok, tl.arange(0, D1), D)
    if D2 > 0:
        b = load_rows(X + D1, row_off, ok, tl.arange(0, D2), D - D1)
    else:
        b = a
    return a, b


@triton.jit
def dot_nt(a1, a2, b1, b2, D2: tl.constexpr, PREC: tl.constexpr):
    """``a @ b^T`` over a split head dim (``a2``/``b2`` unused when ``D2 == 0``)."""
    s = tl.dot(a1, tl.trans(b1), input_precision=PREC)
    if D2 > 0:
        s += tl.dot(a2, tl.trans(b2), input_precision=PREC)
    return s
