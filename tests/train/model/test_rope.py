"""RoPE tables and YaRN scaling."""

import math

import pytest
import torch

from nsa.rope import apply_rotary
from train.model.rope import RotaryEmbedding, rope_frequencies


def test_plain_rope_is_relative():
    """q.k after rotation depends only on the position difference."""
    rope = RotaryEmbedding(16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16, dtype=torch.float64)

    def dot(i, j):
        ci, si = rope(torch.tensor([[i]]))
        cj, sj = rope(torch.tensor([[j]]))
        return float((apply_rotary(q, ci, si) * apply_rotary(k, cj, sj)).sum())

    # float32 tables: positions ~100 carry angle errors ~1e-5 rad
    assert dot(7, 3) == pytest.approx(dot(107, 103), rel=1e-4)


def test_yarn_frequencies():
    dim, theta = 64, 10000.0
    base, m0 = rope_frequencies(dim, theta)
    yarn, mscale = rope_frequencies(dim, theta, {"type": "yarn", "factor": 4.0,
                                                  "original_max_position_embeddings": 4096})
    assert m0 == 1.0 and mscale == pytest.approx(0.1 * math.log(4.0) + 1.0)
    # high frequencies (many turns over the original context) are kept ...
    assert torch.allclose(yarn[:4], base[:4])
    # ... the lowest ones are interpolated by the factor, and the ramp lies between
    assert torch.allclose(yarn[-4:], base[-4:] / 4.0)
    ratio = base / yarn
    assert ((ratio >= 1 - 1e-12) & (ratio <= 4 + 1e-12)).all() and (ratio[1:] >= ratio[:-1] - 1e-12).all()


def test_yarn_tables_scaled_by_mscale():
    rope = RotaryEmbedding(8, scaling={"type": "yarn", "factor": 2.0, "original_max_position_embeddings": 16,
                                       "mscale": 1.5})
    cos, sin = rope(torch.arange(5)[None])
    assert torch.allclose(cos.square() + sin.square(), torch.full_like(cos, 2.25))
    assert cos.shape == (1, 5, 4) and cos.dtype == torch.float32


def test_bad_scaling_raises():
    with pytest.raises(ValueError, match="factor"):
        RotaryEmbedding(8, scaling={"type": "yarn", "factor": 0.5, "original_max_position_embeddings": 16})
    with pytest.raises(ValueError, match=r"\[B, T\]"):
        RotaryEmbedding(8)(torch.arange(4))
