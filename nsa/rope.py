"""Rotary position embedding (RoPE), rotate-half (GPT-NeoX) convention.

The caller owns the frequencies (plain RoPE, YaRN scaling, per-document
positions under packing): this module only applies a precomputed rotation, so
the NSA layer and the full-attention layer rotate keys identically.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` [B, T, H, D] by angles given as ``cos``/``sin`` [B, T, D//2].

    Rotate-half convention: the pair rotated together is ``(x[..., i], x[..., i + D//2])``.
    The rotation runs in float32, float64 for float64 input (bf16 loses precision at large positions)
    and the result is cast back to ``x.dtype``.
    """
    if x.dim() != 4:
        raise ValueError(f"apply_rotary: x must be [B, T, H, D], got shape {tuple(x.shape)}")
    B, T, _, D = x.shape
    if D % 2:
        raise ValueError(f"apply_rotary: head dim must be even, got {D}")
    want = (B, T, D // 2)
    if tuple(cos.shape) != want or tuple(sin.shape) != want:
        raise ValueError(
            f"apply_rotary: cos/sin must be [B, T, D//2] = {want}, got {tuple(cos.shape)} and {tuple(sin.shape)}"
        )
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    x1, x2 = xf[..., : D // 2], xf[..., D // 2 :]
    c = cos.to(acc).unsqueeze(2)
    s = sin.to(acc).unsqueeze(2)
    out = torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1)
    return out.to(x.dtype)


def rotary_tables(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain RoPE angles for integer ``positions [B, T]`` -> ``cos, sin [B, T, head_dim//2]`` float32.

    Frequency ``i`` is ``theta ** (-2i / head_dim)``. Models with YaRN or other
    scalings build their own tables; this is the unscaled default.
    """
    if head_dim % 2 or head_dim < 2:
        raise ValueError(f"rotary_tables: head_dim must be even and >= 2, got {head_dim}")
    if positions.dim() != 2:
        raise ValueError(f"rotary_tables: positions must be [B, T], got shape {tuple(positions.shape)}")
    inv_freq = theta ** (-torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float64) / head_dim)
    angles = positions.to(torch.float64)[..., None] * inv_freq
    return angles.cos().float(), angles.sin().float()
