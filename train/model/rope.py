"""Rotary position embedding tables, with optional YaRN scaling.

``RotaryEmbedding(dim, theta, scaling)(position_ids [B,T]) -> (cos, sin)``, each
``[B, T, dim // 2]`` float32, for ``nsa.rope.apply_rotary`` (rotate-half
convention). Tables are computed from position ids on the fly, so packed
documents (positions restarting per document) and decode offsets need nothing
special.

YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"): frequencies
whose wavelength is short compared with the original context (more than
``beta_fast`` rotations over it) are kept; those with fewer than ``beta_slow``
rotations are interpolated by ``factor``; a linear ramp blends the band between.
cos/sin are multiplied by ``mscale`` (default ``0.1 * ln(factor) + 1``), which
scales attention logits to keep their entropy as the context grows.
"""

from __future__ import annotations

import math

import torch
from torch import nn

YARN_KEYS = {"type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale"}


def validate_rope_scaling(scaling: dict) -> None:
    """Raise ValueError for an unusable ``rope_scaling`` dict."""
    if not isinstance(scaling, dict):
        raise ValueError(f"rope_scaling must be a dict or null, got {type(scaling).__name__}")
    unknown = set(scaling) - YARN_KEYS
    if unknown:
        raise ValueError(f"rope_scaling: unknown keys {sorted(unknown)}; allowed: {sorted(YARN_KEYS)}")
    if scaling.get("type", "yarn") != "yarn":
        raise ValueError(f"rope_scaling.type must be 'yarn', got {scaling.get('type')!r}")
    if float(scaling.get("factor", 0)) < 1:
        raise ValueError(f"rope_scaling.factor must be >= 1, got {scaling.get('factor')}")
    if int(scaling.get("original_max_position_embeddings", 0)) < 1:
        raise ValueError("rope_scaling.original_max_position_embeddings must be set and >= 1")
    if float(scaling.get("beta_fast", 32.0)) <= float(scaling.get("beta_slow", 1.0)):
        raise ValueError("rope_scaling.beta_fast must be > beta_slow")


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    """Frequency index whose wavelength completes ``num_rotations`` turns over ``max_pos``."""
    return dim * math.log(max_pos / (num_rotations * 2 * math.pi)) / (2 * math.log(base))


def rope_frequencies(dim: int, theta: float, scaling: dict | None = None) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[dim // 2]`` float64 and the cos/sin multiplier (mscale)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float64, device="cpu") / dim)
    if scaling is None:
        return inv_freq, 1.0
    validate_rope_scaling(scaling)
    factor = float(scaling["factor"])
    orig = int(scaling["original_max_position_embeddings"])
    beta_fast, beta_slow = float(scaling.get("beta_fast", 32.0)), float(scaling.get("beta_slow", 1.0))
    low = max(math.floor(_yarn_correction_dim(beta_fast, dim, theta, orig)), 0)
    high = min(math.ceil(_yarn_correction_dim(beta_slow, dim, theta, orig)), dim // 2 - 1)
    idx = torch.arange(dim // 2, dtype=torch.float64, device="cpu")
    ramp = ((idx - low) / max(high - low, 1e-3)).clamp(0, 1)  # 0: keep, 1: interpolate
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    mscale = scaling.get("mscale")
    mscale = 0.1 * math.log(factor) + 1.0 if mscale is None else float(mscale)
    return inv_freq, mscale


class RotaryEmbedding(nn.Module):
    """cos/sin tables ``[B, T, dim // 2]`` (float32) from ``position_ids [B, T]``.

    The frequencies are a plain float64 CPU attribute, not a buffer, so that
    ``model.to(bfloat16)`` cannot round them and a meta-device build still has them;
    angles are computed in float64 (exact positions up to 2**53) and rounded once.
    """

    def __init__(self, dim: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.inv_freq, self.mscale = rope_frequencies(dim, theta, scaling)
        self._on_device: dict[torch.device, torch.Tensor] = {}

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if position_ids.dim() != 2:
            raise ValueError(f"position_ids must be [B, T], got shape {tuple(position_ids.shape)}")
        dev = position_ids.device
        if dev not in self._on_device:
            self._on_device[dev] = self.inv_freq.to(dev)
        angles = position_ids.to(torch.float64)[..., None] * self._on_device[dev]
        return (angles.cos() * self.mscale).float(), (angles.sin() * self.mscale).float()
