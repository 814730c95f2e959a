"""Model FLOPs per token, for MFU.

``flops_per_token(model_cfg, attention_cfg, seq_len, training=True) -> dict`` counts
multiply-adds as 2 FLOPs, averaged over the ``seq_len`` positions of one causal
sequence (position ``t`` attends ``t + 1`` tokens for full attention), per token:

* ``matmul``: 2 x the weights each token multiplies: attention projections (GQA:
  K/V are ``Hkv`` heads; NSA: one K/V pair per branch unless shared, plus the
  ``3H`` gate logits), MLP (dense SwiGLU, or for MoE the router plus the
  ``top_k + shared`` active experts only) and the LM head. The embedding is a
  lookup (0 FLOPs); norms and activations are ignored (O(C) per token).
* ``attention``: ``2 * H * (Dk + Dv)`` per key read. Full: ``t + 1`` keys. NSA: the
  three branches, ``N_t = floor((t - l + 1)/d) + 1`` compressed keys, ``min(n*l', t+1)``
  selected and ``min(w, t+1)`` window keys.
* ``compression`` (NSA, MLP ``phi``): the block MLP for K and V runs once per
  compressed block and KV head, i.e. ``N_T / T`` times per token.
* ``selection`` (NSA): the selection step re-derives the compressed probabilities
  (``q.k`` again, ``2*H*Dk`` per compressed key), sums them over the group and over
  the ``l/d x l'/d`` overlap pattern for each causal selection block.

``training=True`` reports ``total = 3 * forward`` (backward ~ 2 x forward).
"""

from __future__ import annotations

import numpy as np

from train.model.config import AttentionConfig, ModelConfig


def _projection_weights(cfg: ModelConfig, attn: AttentionConfig) -> int:
    C, H, Hkv, Dk, Dv = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v
    kv_sets = 1 if attn.kind == "full" or attn.share_kv else 3
    gates = 3 * H * C if attn.kind == "nsa" else 0
    return C * H * Dk + kv_sets * C * Hkv * (Dk + Dv) + H * Dv * C + gates


def _mlp_weights(cfg: ModelConfig, layer: int) -> int:
    C = cfg.hidden_size
    if not cfg.is_moe_layer(layer):
        return 3 * C * cfg.intermediate_size
    moe = cfg.moe
    return C * moe.num_experts + (moe.top_k + moe.num_shared_experts) * 3 * C * moe.expert_size


def _compress_flops_per_block(cfg: ModelConfig, attn: AttentionConfig) -> int:
    """FLOPs of phi_K and phi_V for one block of one KV head."""
    l = attn.block_len
    total = 0
    for D in (cfg.head_dim_k, cfg.head_dim_v):
        if attn.compress == "mean":
            total += l * D
        else:
            h = attn.compress_hidden or D
            total += 2 * (l * D * h + h * D)
    return total


def flops_per_token(model_cfg: ModelConfig, attention_cfg: AttentionConfig, seq_len: int,
                    training: bool = True) -> dict[str, float]:
    """FLOPs per token, averaged over a causal sequence of ``seq_len`` tokens (see module doc)."""
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    cfg, attn = model_cfg, attention_cfg
    L, H, Hkv, Dk, Dv = cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v
    weights = L * _projection_weights(cfg, attn) + sum(_mlp_weights(cfg, i) for i in range(L))
    weights += cfg.hidden_size * cfg.vocab_size
    out = {"matmul": 2.0 * weights, "attention": 0.0, "compression": 0.0, "selection": 0.0}
    t = np.arange(seq_len, dtype=np.float64)
    per_key = 2.0 * H * (Dk + Dv)
    if attn.kind == "full":
        out["attention"] = L * per_key * (t + 1).mean()
    else:
        l, d, ls = attn.block_len, attn.stride, attn.select_len
        n_cmp = np.where(t >= l - 1, np.floor((t - l + 1) / d) + 1, 0.0)
        keys = n_cmp + np.minimum(attn.num_select * ls, t + 1) + np.minimum(attn.window, t + 1)
        out["attention"] = L * per_key * keys.mean()
        n_blocks = n_cmp[-1]  # compressed blocks of the whole sequence, each built once
        out["compression"] = L * Hkv * _compress_flops_per_block(cfg, attn) * n_blocks / seq_len
        sel_blocks = np.floor(t / ls) + 1
        scoring = H * (2 * Dk + 1) * n_cmp + Hkv * sel_blocks * (l // d) * (ls // d)
        out["selection"] = L * scoring.mean()
    out["forward"] = out["matmul"] + out["attention"] + out["compression"] + out["selection"]
    out["total"] = 3 * out["forward"] if training else out["forward"]
    return out


def mfu(tokens_per_second: float, flops_per_token_total: float, peak_flops: float) -> float:
    """Model FLOPs utilisation: achieved model FLOP/s over the hardware peak."""
    if peak_flops <= 0:
        raise ValueError(f"peak_flops must be > 0, got {peak_flops}")
    return tokens_per_second * flops_per_token_total / peak_flops
