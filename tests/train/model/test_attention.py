"""Attention layers inside the model: shapes, causality, varlen isolation, reference numerics."""

import pytest
import torch

import train.model.attention as attention
from train.model import build_model
from train.model.attention import FullAttention
from train.model.rope import RotaryEmbedding

from .helpers import KINDS, attn_cfg, model_cfg, rel_err


def _tables(B, T, dim, offset=0):
    pos = torch.arange(offset, offset + T).expand(B, T)
    cos, sin = RotaryEmbedding(dim)(pos)
    return cos.double(), sin.double()


def test_full_attention_matches_explicit_softmax():
    torch.manual_seed(0)
    att = FullAttention(32, num_heads=4, num_kv_heads=2, head_dim_k=8, head_dim_v=6).double()
    x = torch.randn(2, 11, 32, dtype=torch.float64)
    cos, sin = _tables(2, 11, 8)
    y = att(x, cos, sin)
    # reference: repeat K/V over the group, masked softmax
    from nsa.rope import apply_rotary

    q = apply_rotary(att.q_proj(x).view(2, 11, 4, 8), cos, sin)
    k = apply_rotary(att.k_proj(x).view(2, 11, 2, 8), cos, sin).repeat_interleave(2, dim=2)
    v = att.v_proj(x).view(2, 11, 2, 6).repeat_interleave(2, dim=2)
    s = torch.einsum("bthd,bshd->bhts", q, k) * 8 ** -0.5
    s = s.masked_fill(torch.ones(11, 11, dtype=torch.bool).triu(1), float("-inf"))
    o = torch.einsum("bhts,bshd->bthd", s.softmax(-1), v).reshape(2, 11, 24)
    # float64 throughout: only summation order differs
    assert rel_err(y, att.o_proj(o)) < 1e-12
    assert y.shape == (2, 11, 32) and y.dtype == torch.float64


@pytest.mark.parametrize("dk, dv", [(8, 6), (6, 8), (8, 8)])
def test_fused_layout_equals_gqa_broadcast(dk, dv):
    """The CUDA layout (K/V heads repeated, head dims zero-padded) gives the same attention."""
    torch.manual_seed(0)
    q = torch.randn(2, 9, 4, dk, dtype=torch.float64)
    k, v = torch.randn(2, 9, 2, dk, dtype=torch.float64), torch.randn(2, 9, 2, dv, dtype=torch.float64)
    ref = attention._sdpa(q, k, v, scale=0.3, is_causal=True, fused_layout=False)
    got = attention._sdpa(q, k, v, scale=0.3, is_causal=True, fused_layout=True)
    assert got.shape == (2, 9, 4, dv) and rel_err(got, ref) < 1e-12  # float64, same math


@pytest.mark.parametrize("kind", KINDS)
def test_logits_shapes_and_dtype(kind):
    torch.manual_seed(0)
    model = build_model(model_cfg(), attn_cfg(kind))
    ids = torch.randint(0, 97, (2, 40))
    out = model(ids)
    assert out.logits.shape == (2, 40, 97) and out.logits.dtype == torch.float32
    assert out.loss is None and torch.isfinite(out.logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_causality(kind):
    """Changing token t leaves the logits of every earlier position unchanged."""
    torch.manual_seed(0)
    model = build_model(model_cfg(), attn_cfg(kind)).double()
    ids = torch.randint(0, 97, (2, 80))
    t = 50
    changed = ids.clone()
    changed[:, t:] = (changed[:, t:] + 1) % 97
    a, b = model(ids).logits, model(changed).logits
    # float64: earlier positions see identical inputs, so any difference is a leak
    assert rel_err(b[:, :t], a[:, :t]) < 1e-12
    assert rel_err(b[:, t:], a[:, t:]) > 1e-3


@pytest.mark.parametrize("kind, loop", [("full", False), ("full", True), ("nsa", False)])
def test_varlen_isolation(kind, loop, monkeypatch):
    """With cu_seqlens, changing one document changes no other document's logits, and a
    packed document's logits equal those of the document run alone. ``loop``: full
    attention's per-document loop instead of the block-diagonal mask."""
    if loop:
        monkeypatch.setattr(attention, "MASK_MAX_ELEMENTS", 0)
    else:  # these short documents fill 27% of the row's scores: force the one masked call
        monkeypatch.setattr(attention, "MASK_MIN_FILL", 0.0)
    torch.manual_seed(0)
    model = build_model(model_cfg(), attn_cfg(kind)).double()
    ids = torch.randint(0, 97, (2, 60))
    cu = torch.tensor([0, 35, 60, 100, 120], dtype=torch.int32)  # a document straddles the two rows
    base = model(ids, cu_seqlens=cu).logits.reshape(120, -1)
    changed = ids.clone().view(-1)
    changed[60:100] = (changed[60:100] + 3) % 97
    other = model(changed.view(2, 60), cu_seqlens=cu).logits.reshape(120, -1)
    keep = torch.cat([torch.arange(0, 60), torch.arange(100, 120)])
    assert rel_err(other[keep], base[keep]) < 1e-12
    assert rel_err(other[60:100], base[60:100]) > 1e-3
    alone = model(ids.view(-1)[35:60][None]).logits[0]
    assert rel_err(base[35:60], alone) < 1e-10  # same math, different batching of the kernels
