"""Small configurations shared by the model tests (CPU, float64 where numerics are compared)."""

import torch

from train.model import AttentionConfig, ModelConfig, MoEConfig

# Small NSA settings: with T=80 tokens there are several compression blocks
# (l=8, d=4), several selection blocks (l'=16) of which n=3 are picked, and the
# window (w=16) is much shorter than the sequence, so every branch is exercised.
NSA_SMALL = dict(kind="nsa", block_len=8, stride=4, select_len=16, num_select=3, num_init=1, num_local=1,
                 window=16, backend="torch")


def model_cfg(mlp="swiglu", **kw) -> ModelConfig:
    base = dict(vocab_size=97, hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim_k=16,
                head_dim_v=8, mlp=mlp, intermediate_size=96, first_k_dense=1 if mlp == "moe" else 0,
                moe=MoEConfig(num_experts=4, num_shared_experts=1, top_k=2, expert_size=32))
    base.update(kw)
    return ModelConfig(**base)


def attn_cfg(kind="full") -> AttentionConfig:
    return AttentionConfig(**NSA_SMALL) if kind == "nsa" else AttentionConfig(kind="full")


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


KINDS = ["full", "nsa"]
