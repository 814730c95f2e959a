"""Decoder-only transformer LM with full or NSA attention and dense or MoE MLPs.

``Transformer.forward(input_ids [B,T], position_ids=None, cu_seqlens=None,
labels=None, cache=None) -> ModelOutput(logits [B,T,V] , loss, aux_loss, stats)``.

* Blocks are pre-norm: ``x + attn(norm(x))``, then ``x + mlp(norm(x))`` (RMSNorm).
* With ``cu_seqlens`` (int32 ``[N+1]`` over the ``B*T`` flattened tokens) the batch
  is one packed row of documents for attention (flash-attn convention); position
  ids default to restarting at 0 per document. MLPs are per-token and see ``[B,T]``.
* ``labels[b, t]`` is the target of position ``t`` (the data loader shifts; -100 is
  ignored). ``loss`` = mean token cross-entropy + ``aux_loss`` (the MoE balance and
  z-losses and NSA's selection distillation, already weighted), i.e. what to backpropagate; ``stats["lm_loss"]`` is
  the cross-entropy alone.
* ``stats``: python floats: ``lm_loss``, ``moe/aux_loss``, ``moe/load_cv`` (mean over
  MoE layers), ``moe/max_over_mean`` (max over layers), ``moe/dropped_frac``,
  ``moe/loads`` (per-layer lists of token counts, before dropping) and
  ``nsa/gate_{cmp,slc,win}`` and, when it is trained, ``nsa/select_kl`` (mean over layers; not for a step with a decoding cache: nothing
  reads them there, and their reductions would add a few small ops per layer to every token).
* Init: every weight ~ normal(0, init_std), the token embedding ~ normal(0, embed_init_std
  or init_std); projections that write into the residual
  stream (attention output, MLP down, expert down) use ``init_std / sqrt(2 * num_layers)``
  (GPT-2 / Megatron), norms start at 1. Full and NSA attention thus start with the
  same q/k/v/o statistics; NSA's own extra parts (branch gates, compression MLP and
  its position embedding) keep the init ``nsa.layer`` gives them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from train.model.attention import FullAttention, validate_cu_seqlens
from train.model.config import AttentionConfig, ModelConfig
from train.model.mlp import SwiGLU
from train.model.moe import MoE, load_summary
from train.model.rope import RotaryEmbedding

OUTPUT_PROJECTIONS = ("o_proj", "down_proj")
# Linear layers this init owns (by leaf name); any other submodule (NSA gates and
# compression MLP) keeps the init its own module chose.
INIT_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "kv_proj", "gate_proj", "up_proj", "lm_head") + OUTPUT_PROJECTIONS


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None
    aux_loss: torch.Tensor
    stats: dict = field(default_factory=dict)


@dataclass
class ModelCache:
    """Decoding state: one cache per layer and the number of tokens already seen."""

    layers: list
    seq_len: int = 0


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


def build_attention(cfg: ModelConfig, attn_cfg: AttentionConfig) -> nn.Module:
    if attn_cfg.kind == "full":
        return FullAttention(cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim_k, cfg.head_dim_v)
    from nsa.layer import NSAAttention

    return NSAAttention(attn_cfg.nsa_config(cfg))


class Block(nn.Module):
    """Pre-norm block; returns ``(x, aux_loss, moe_stats_or_None)``."""

    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig, layer_idx: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.attn = build_attention(cfg, attn_cfg)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg.hidden_size, cfg.moe) if self.is_moe else SwiGLU(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, cu_seqlens=None, cache=None):
        B, T, C = x.shape
        h = self.attn_norm(x)
        if cu_seqlens is not None:
            a = self.attn(h.reshape(1, B * T, C), cos.reshape(1, B * T, -1), sin.reshape(1, B * T, -1),
                          cu_seqlens=cu_seqlens).view(B, T, C)
        else:
            a = self.attn(h, cos, sin, cache=cache)
        x = x + a
        attn_aux = getattr(self.attn, "aux_loss", None)  # NSA's selection distillation, when on
        aux = x.new_zeros((), dtype=torch.float32) if attn_aux is None else attn_aux.float()
        h = self.mlp_norm(x)
        if self.is_moe:
            m, moe_aux, stats = self.mlp(h)
            return x + m, aux + moe_aux, stats
        return x + self.mlp(h), aux, None


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor, total: int) -> torch.Tensor:
    """Position ids ``[total]`` restarting at 0 at every document start."""
    pos = torch.arange(total, device=cu_seqlens.device)
    doc = torch.searchsorted(cu_seqlens[1:].long(), pos, right=True)
    return pos - cu_seqlens.long()[doc]


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, attn_cfg: AttentionConfig):
        super().__init__()
        cfg.validate()
        attn_cfg.validate()
        self.cfg, self.attn_cfg = cfg, attn_cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, attn_cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rotary = RotaryEmbedding(cfg.head_dim_k, cfg.rope_theta, cfg.rope_scaling)
        self.gradient_checkpointing = False
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """(Re-)initialise every weight; also after ``to_empty`` from a meta-device build."""
        for blk in self.layers:
            if not isinstance(blk.attn, FullAttention):
                blk.attn.reset_parameters()  # NSA's own init first; shared projections are redone below
        std = self.cfg.init_std
        out_std = std / math.sqrt(2 * self.cfg.num_layers)
        emb_std = self.cfg.embed_init_std if self.cfg.embed_init_std is not None else std
        nn.init.normal_(self.embed.weight, 0.0, emb_std)
        for name, module in self.named_modules():
            leaf = name.rsplit(".", 1)[-1]
            if isinstance(module, nn.Linear) and leaf in INIT_PROJECTIONS and not self._is_nsa_gate(name):
                nn.init.normal_(module.weight, 0.0, out_std if leaf in OUTPUT_PROJECTIONS else std)
            elif isinstance(module, MoE):
                module.reset_parameters(std, out_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)

    def _is_nsa_gate(self, name: str) -> bool:
        """NSA's branch gate (``attn.gate_proj``) starts at zero weight, see nsa.layer."""
        return name.endswith("attn.gate_proj")

    @torch.no_grad()
    def redraw_token_rows(self, rows: torch.Tensor, generator: torch.Generator | None = None) -> None:
        """Re-draw the embedding rows where ``rows [vocab_size]`` (bool) is True from the init
        distribution (``normal(0, embed_init_std or init_std)``), e.g. ids a previous training
        stage never saw (the trainer's ``train.init_redraw_unseen_embeddings``)."""
        if rows.dtype is not torch.bool or tuple(rows.shape) != (self.cfg.vocab_size,):
            raise ValueError(f"rows must be a bool tensor of shape ({self.cfg.vocab_size},), got "
                             f"{rows.dtype} {tuple(rows.shape)}")
        std = self.cfg.embed_init_std if self.cfg.embed_init_std is not None else self.cfg.init_std
        w = self.embed.weight
        fresh = torch.randn(int(rows.sum()), w.shape[1], generator=generator, dtype=torch.float32) * std
        w[rows.to(w.device)] = fresh.to(device=w.device, dtype=w.dtype)

    def reset_gates(self, branches) -> int:
        """Restart the named NSA branches' gates of every layer at their ``gate_init``
        (:meth:`nsa.layer.NSAAttention.reset_gates`; the trainer's ``train.init_reset_gates``).
        Returns the number of NSA layers (0 for full attention, whose layers have no gates)."""
        layers = [blk.attn for blk in self.layers if hasattr(blk.attn, "reset_gates")]
        for attn in layers:
            attn.reset_gates(branches)
        return len(layers)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute each block in backward (``torch.utils.checkpoint``) to save activations."""
        self.gradient_checkpointing = bool(enabled)

    def new_cache(self, batch_size: int, max_len: int, device=None, dtype=None) -> ModelCache:
        """Empty decoding cache for ``batch_size`` rows of up to ``max_len`` tokens."""
        device = device or self.embed.weight.device
        dtype = dtype or self.embed.weight.dtype
        return ModelCache([blk.attn.new_cache(batch_size, max_len, device, dtype) for blk in self.layers])

    def update_moe_bias(self) -> None:
        """Auxiliary-loss-free balancing step for every MoE layer (call after optimizer.step())."""
        for blk in self.layers:
            if blk.is_moe:
                blk.mlp.update_bias()

    def _positions(self, input_ids, position_ids, cu_seqlens, cache):
        B, T = input_ids.shape
        if position_ids is not None:
            if position_ids.shape != input_ids.shape:
                raise ValueError(f"position_ids shape {tuple(position_ids.shape)} != input_ids shape {(B, T)}")
            return position_ids
        if cu_seqlens is not None:
            return positions_from_cu_seqlens(cu_seqlens, B * T).view(B, T)
        start = cache.seq_len if cache is not None else 0
        return torch.arange(start, start + T, device=input_ids.device).expand(B, T)

    def forward(self, input_ids, position_ids=None, cu_seqlens=None, labels=None, cache: ModelCache | None = None):
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got shape {tuple(input_ids.shape)}")
        B, T = input_ids.shape
        if cu_seqlens is not None:
            if cache is not None:
                raise ValueError("cu_seqlens (packed documents) cannot be combined with a decoding cache")
            validate_cu_seqlens(cu_seqlens, B * T)
        if cache is not None and len(cache.layers) != len(self.layers):
            raise ValueError(f"cache has {len(cache.layers)} layers, model has {len(self.layers)}")
        cos, sin = self.rotary(self._positions(input_ids, position_ids, cu_seqlens, cache))
        x = self.embed(input_ids)
        aux_loss = x.new_zeros((), dtype=torch.float32)
        moe_stats = []
        use_ckpt = self.gradient_checkpointing and self.training and cache is None and torch.is_grad_enabled()
        for i, blk in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            if use_ckpt:
                x, aux, st = checkpoint(blk, x, cos, sin, cu_seqlens, None, use_reentrant=False)
            else:
                x, aux, st = blk(x, cos, sin, cu_seqlens, layer_cache)
            aux_loss = aux_loss + aux
            if st is not None:
                if self.training:
                    blk.mlp.record_load(st["load"])
                moe_stats.append(st)
        if cache is not None:
            cache.seq_len += T
        x = self.norm(x)
        logits = self.lm_head(x) if self.lm_head is not None else F.linear(x, self.embed.weight)

        stats, loss = {}, None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels shape {tuple(labels.shape)} != input_ids shape {(B, T)}")
            flat = labels.reshape(-1)
            nll = F.cross_entropy(logits.float().view(-1, logits.shape[-1]), flat, ignore_index=-100,
                                  reduction="sum")
            lm_loss = nll / (flat != -100).sum().clamp_min(1)
            loss = lm_loss + aux_loss
            stats["lm_loss"] = float(lm_loss.detach())
        stats.update(self._moe_stats(moe_stats))
        if cache is None:
            stats.update(self._nsa_stats())
        return ModelOutput(logits=logits, loss=loss, aux_loss=aux_loss, stats=stats)

    @staticmethod
    def _moe_stats(moe_stats: list) -> dict:
        if not moe_stats:
            return {}
        summaries = [load_summary(st["load"]) for st in moe_stats]
        return {
            "moe/aux_loss": float(sum(st["aux"] for st in moe_stats)),  # the MoE layers' share of aux_loss
            "moe/load_cv": sum(s["cv"] for s in summaries) / len(summaries),
            "moe/max_over_mean": max(s["max_over_mean"] for s in summaries),
            "moe/dropped_frac": sum(st["dropped"] for st in moe_stats) / sum(st["assignments"] for st in moe_stats),
            "moe/loads": [st["load"].tolist() for st in moe_stats],
        }

    def _nsa_stats(self) -> dict:
        means = [getattr(blk.attn, "last_gate_means", None) for blk in self.layers]
        means = [m for m in means if m]
        if not means:
            return {}
        stats = {f"nsa/gate_{k.removeprefix('g_')}": sum(float(m[k]) for m in means) / len(means) for k in means[0]}
        kls = [blk.attn.last_select_kl for blk in self.layers if getattr(blk.attn, "last_select_kl", None) is not None]
        if kls:
            stats["nsa/select_kl"] = float(torch.stack(kls).mean())
        return stats


def build_model(model_cfg, attention_cfg) -> Transformer:
    """``Transformer`` from configs (dataclasses or plain dicts)."""
    if isinstance(model_cfg, dict):
        model_cfg = ModelConfig.from_dict(model_cfg)
    if isinstance(attention_cfg, dict):
        attention_cfg = AttentionConfig.from_dict(attention_cfg)
    return Transformer(model_cfg, attention_cfg)


def count_parameters(model_or_cfg, attention_cfg=None) -> dict[str, int]:
    """Total, active (shared + top-k routed experts per token) and embedding parameter
    counts. A config is built on the meta device, so any size is cheap to count."""
    model = model_or_cfg
    if not isinstance(model, Transformer):
        if attention_cfg is None:
            raise ValueError("count_parameters(cfg, attention_cfg): attention_cfg is required with a config")
        with torch.device("meta"):
            model = build_model(model_or_cfg, attention_cfg)
    total = sum(p.numel() for p in model.parameters())
    inactive = 0
    for blk in model.layers:
        if blk.is_moe:
            moe = blk.mlp.cfg
            per_expert = (blk.mlp.w_gate[0].numel() + blk.mlp.w_up[0].numel() + blk.mlp.w_down[0].numel())
            inactive += (moe.num_experts - moe.top_k) * per_expert
    embedding = model.embed.weight.numel() + (model.lm_head.weight.numel() if model.lm_head is not None else 0)
    return {"total": total, "active": total - inactive, "embedding": embedding}
