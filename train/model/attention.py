"""Full (dense, causal) grouped-query attention with the same interface as
``nsa.layer.NSAAttention``: ``forward(x [B,T,C], cos, sin, cu_seqlens=None,
cache=None) -> [B,T,C]`` and ``new_cache(batch_size, max_len, device, dtype)``.

Attention runs through ``torch.nn.functional.scaled_dot_product_attention`` with
``enable_gqa`` (no K/V repeat). Packed documents (``cu_seqlens``, ``B == 1``) are
isolated either by one block-diagonal causal mask (short rows of few documents, one
kernel call) or, when that mask would exceed ``MASK_MAX_ELEMENTS`` or mostly mask out
scores between documents, by a loop over documents with ``is_causal`` (memory
O(longest document^2) at most, flash kernels on GPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nsa.rope import apply_rotary

MASK_MAX_ELEMENTS = 1 << 24  # 16M bools = 16 MiB: above this, loop over documents instead
MASK_MIN_FILL = 0.5  # one masked call only if the documents' scores are at least this share of T^2


def validate_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> None:
    """Check the flash-attn convention: int32 ``[N+1]``, 0 first, ``total`` last, non-decreasing."""
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D [N+1] with N >= 1, got shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"cu_seqlens must be int32, got {cu_seqlens.dtype}")
    if int(cu_seqlens[0]) != 0 or int(cu_seqlens[-1]) != total:
        raise ValueError(f"cu_seqlens must start at 0 and end at the packed length {total}, "
                         f"got {int(cu_seqlens[0])}..{int(cu_seqlens[-1])}")
    if bool((cu_seqlens[1:] < cu_seqlens[:-1]).any()):
        raise ValueError("cu_seqlens must be non-decreasing")


class KVCache:
    """Decoding state of one full-attention layer: K ``[B, max_len, Hkv, Dk]``,
    V ``[B, max_len, Hkv, Dv]`` and the number of tokens filled (same for all rows)."""

    def __init__(self, batch_size, max_len, num_kv_heads, head_dim_k, head_dim_v, device=None, dtype=None):
        self.k = torch.zeros(batch_size, max_len, num_kv_heads, head_dim_k, device=device, dtype=dtype)
        self.v = torch.zeros(batch_size, max_len, num_kv_heads, head_dim_v, device=device, dtype=dtype)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.shape[1]

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Store ``k, v [B, T, ...]``; return all cached K, V ``[B, past+T, ...]`` and ``past``."""
        past, T = self.length, k.shape[1]
        if k.shape[0] != self.k.shape[0]:
            raise ValueError(f"cache holds batch {self.k.shape[0]}, got batch {k.shape[0]}")
        if past + T > self.max_len:
            raise ValueError(f"KV cache overflow: {past} + {T} tokens > max_len {self.max_len}")
        self.k[:, past:past + T] = k.to(self.k.dtype)
        self.v[:, past:past + T] = v.to(self.v.dtype)
        self.length = past + T
        return self.k[:, :past + T], self.v[:, :past + T], past


def _sdpa(q, k, v, *, scale, mask=None, is_causal=False, fused_layout=None):
    """SDPA on ``[B, T, H, D]`` tensors; returns ``[B, T, H, Dv]``.

    CPU: GQA through ``enable_gqa``. CUDA (``fused_layout``, default ``q.is_cuda``): the
    flash kernel, the only one that takes ``enable_gqa``, needs ``Dv == Dk``; otherwise
    SDPA silently falls back to the O(T^2)-memory math path. So K/V heads are repeated
    to ``H`` and the narrower of q/k and v is zero-padded (zeros change neither ``q.k``
    nor the kept output columns).
    """
    H, Dk, Dv = q.shape[2], q.shape[-1], v.shape[-1]
    gqa = H != k.shape[2]
    if q.is_cuda if fused_layout is None else fused_layout:
        if gqa:
            k, v = (t.repeat_interleave(H // k.shape[2], dim=2) for t in (k, v))
            gqa = False
        if Dv < Dk:
            v = F.pad(v, (0, Dk - Dv))
        elif Dk < Dv:
            q, k = F.pad(q, (0, Dv - Dk)), F.pad(k, (0, Dv - Dk))
    o = F.scaled_dot_product_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
        attn_mask=mask, is_causal=is_causal, scale=scale, enable_gqa=gqa)
    return o.transpose(1, 2)[..., :Dv]


def causal_attention(q, k, v, *, scale):
    """Causal attention of ``T`` queries over the same ``T`` keys (training, prefill)."""
    return _sdpa(q, k, v, scale=scale, is_causal=q.shape[1] > 1)


def decode_attention(q, k, v, *, scale, offset: int):
    """``T`` new queries at positions ``offset .. offset+T-1`` over ``S = offset+T`` cached keys.

    The ``G`` query heads of a KV group are packed as ``G*T`` query rows of that KV
    head, so the cache is read once per KV head, with no head repetition (decode is
    memory-bound: this is the step ``bench.decode`` times)."""
    B, T, H, Dk = q.shape
    S, Hkv, Dv = k.shape[1], k.shape[2], v.shape[-1]
    G = H // Hkv
    qg = q.view(B, T, Hkv, G, Dk).permute(0, 2, 3, 1, 4).reshape(B, Hkv, G * T, Dk)
    mask = None
    if T > 1:  # rows are (g, t), g-major: query t sees keys s <= offset + t
        pos = torch.arange(T, device=q.device) + offset
        mask = (pos[:, None] >= torch.arange(S, device=q.device)[None, :]).repeat(G, 1)
    o = F.scaled_dot_product_attention(qg, k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask, scale=scale)
    return o.view(B, Hkv, G, T, Dv).permute(0, 3, 1, 2, 4).reshape(B, T, H, Dv)


def varlen_causal_attention(q, k, v, cu_seqlens: torch.Tensor, *, scale):
    """Causal attention within each packed document of a ``B == 1`` row.

    One masked call over the whole row computes all ``T^2`` scores, so it is used only when
    the documents' own ``sum(L_i^2)`` is at least half of that (few long documents) and the mask
    is small; otherwise one causal call per document (e.g. 14 documents of ~300 tokens in 4
    rows of 1024, flattened: 13x fewer scores, ~12x faster forward+backward on a CPU)."""
    T = q.shape[1]
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.float64)
    if T * T <= MASK_MAX_ELEMENTS and float(lengths.square().sum()) >= MASK_MIN_FILL * T * T:
        pos = torch.arange(T, device=q.device)
        doc = torch.searchsorted(cu_seqlens[1:].to(torch.long), pos, right=True)
        mask = (doc[:, None] == doc[None, :]) & (pos[:, None] >= pos[None, :])
        return _sdpa(q, k, v, scale=scale, mask=mask)
    out = torch.empty(*q.shape[:3], v.shape[-1], device=q.device, dtype=q.dtype)
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        if end > start:
            out[:, start:end] = _sdpa(q[:, start:end], k[:, start:end], v[:, start:end],
                                      scale=scale, is_causal=True)
    return out


class FullAttention(nn.Module):
    """Causal GQA softmax attention: ``H`` query heads of dim ``Dk``, ``Hkv`` K/V heads
    (``Dk`` keys, ``Dv`` values), RoPE on q and k, output projection ``H*Dv -> C``."""

    def __init__(self, hidden_size: int, num_heads: int, num_kv_heads: int, head_dim_k: int, head_dim_v: int):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"num_heads={num_heads} must be divisible by num_kv_heads={num_kv_heads}")
        self.num_heads, self.num_kv_heads = num_heads, num_kv_heads
        self.head_dim_k, self.head_dim_v = head_dim_k, head_dim_v
        self.scale = head_dim_k ** -0.5
        self.q_proj = nn.Linear(hidden_size, num_heads * head_dim_k, bias=False)
        self.k_proj = nn.Linear(hidden_size, num_kv_heads * head_dim_k, bias=False)
        self.v_proj = nn.Linear(hidden_size, num_kv_heads * head_dim_v, bias=False)
        self.o_proj = nn.Linear(num_heads * head_dim_v, hidden_size, bias=False)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> KVCache:
        dtype = dtype or self.k_proj.weight.dtype
        device = device or self.k_proj.weight.device
        return KVCache(batch_size, max_len, self.num_kv_heads, self.head_dim_k, self.head_dim_v, device, dtype)

    def forward(self, x, cos, sin, cu_seqlens=None, cache: KVCache | None = None):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.num_heads, self.head_dim_k)
        k = self.k_proj(x).view(B, T, self.num_kv_heads, self.head_dim_k)
        v = self.v_proj(x).view(B, T, self.num_kv_heads, self.head_dim_v)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is not None:
            if cu_seqlens is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a decoding cache")
            k, v, past = cache.append(k, v)
            k, v = k.to(q.dtype), v.to(q.dtype)
            if past == 0:  # prefill: the training kernel path
                o = causal_attention(q, k, v, scale=self.scale)
            else:
                o = decode_attention(q, k, v, scale=self.scale, offset=past)
        elif cu_seqlens is not None:
            if B != 1:
                raise ValueError(f"cu_seqlens needs a packed batch with B == 1, got B={B}")
            o = varlen_causal_attention(q, k, v, cu_seqlens, scale=self.scale)
        else:
            o = causal_attention(q, k, v, scale=self.scale)
        return self.o_proj(o.reshape(B, T, self.num_heads * self.head_dim_v))
