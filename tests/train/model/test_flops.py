"""FLOPs per token: exact for a small dense model, sparse-vs-full ratios, MoE active experts."""

import pytest

from train.model import AttentionConfig, MoEConfig
from train.model.flops import flops_per_token, mfu

from .helpers import model_cfg


def test_full_attention_by_hand():
    cfg = model_cfg()  # V=97, C=64, 2 layers, H=4, Hkv=2, Dk=16, Dv=8, I=96
    f = flops_per_token(cfg, AttentionConfig(kind="full"), seq_len=10, training=False)
    proj = 64 * 4 * 16 + 64 * 2 * (16 + 8) + 4 * 8 * 64
    assert f["matmul"] == 2 * (2 * (proj + 3 * 64 * 96) + 64 * 97)
    assert f["attention"] == 2 * 2 * 4 * (16 + 8) * 5.5  # mean keys over t=0..9 is 5.5
    assert f["compression"] == f["selection"] == 0
    assert flops_per_token(cfg, AttentionConfig(kind="full"), 10)["total"] == 3 * f["forward"]


def test_nsa_attention_is_sparse_at_long_context():
    """Paper settings at 64k: each query reads ~N/d + n*l' + w keys instead of ~T/2 on average."""
    cfg = model_cfg(num_heads=64, num_kv_heads=4, head_dim_k=192, head_dim_v=128)
    nsa = AttentionConfig(kind="nsa")
    full = flops_per_token(cfg, AttentionConfig(kind="full"), 65536)
    sparse = flops_per_token(cfg, nsa, 65536)
    # full: mean keys 32768.5; NSA: mean compressed ~2047, selected 1024, window 512 -> ~3583
    ratio = full["attention"] / sparse["attention"]
    assert 8.5 < ratio < 9.5
    assert sparse["matmul"] > full["matmul"]  # two more K/V projection sets and the gates
    assert 0 < sparse["compression"] < 0.1 * sparse["attention"]
    assert 0 < sparse["selection"] < sparse["attention"]
    short = flops_per_token(cfg, nsa, 16)
    assert short["attention"] == flops_per_token(cfg, AttentionConfig(kind="full"), 16)["attention"] * 2
    # at 16 tokens nothing is compressed yet: the selected and window branches both read all t+1 tokens


def test_moe_counts_active_experts_only():
    moe = MoEConfig(num_experts=64, num_shared_experts=1, top_k=2, expert_size=32)
    dense_first = model_cfg("moe", moe=moe)
    f = flops_per_token(dense_first, AttentionConfig(kind="full"), 8, training=False)
    more_experts = model_cfg("moe", moe=MoEConfig(num_experts=128, num_shared_experts=1, top_k=2, expert_size=32))
    g = flops_per_token(more_experts, AttentionConfig(kind="full"), 8, training=False)
    assert g["matmul"] - f["matmul"] == 2 * 64 * 64  # only the router grows


def test_mfu_and_errors():
    assert mfu(1000.0, 1e9, 1e13) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(model_cfg(), AttentionConfig(), 0)
