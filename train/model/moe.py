"""DeepSeekMoE feed-forward layer: shared experts plus fine-grained routed experts.

``MoE(hidden_size, cfg)(x [B,T,C]) -> (y [B,T,C], aux_loss [], stats)``; ``stats``: ``load [E]``,
``dropped``, ``assignments`` and ``aux`` (``aux_loss`` detached, for logging).

Routing (per token): router logits ``[N, E]`` in float32, scores = softmax or
sigmoid of them. The top-k experts are chosen on ``scores + expert_bias`` (the
auxiliary-loss-free bias, DeepSeek-V3; used for selection only) and weighted by
the un-biased scores, renormalised over the top-k for sigmoid scores.

Balancing, each switchable from ``MoEConfig``:
* auxiliary loss ``coef * sum_i f_i * P_i`` with ``f_i`` the fraction of top-k slots
  routed to expert ``i`` (scaled by ``E/K`` so a uniform router gives 1) and ``P_i``
  its mean normalised score, computed per sequence (row of the batch) and averaged
  ("seq"), or over all tokens ("batch");
* bias update: ``update_bias()`` (the trainer calls it after each optimizer step)
  moves ``expert_bias += rate * sign(mean_load - load)`` using the loads recorded
  since the last call (``record_load``), all-reduced when torch.distributed runs;
* router z-loss ``coef * mean(logsumexp(logits)^2)``.

Dispatch: the ``N*K`` (token, expert) assignments are sorted by expert (stable, so
token order is kept inside an expert) and each expert runs once on its slice, so
compute is proportional to active parameters. Dropless by default; with
``capacity_factor`` an expert keeps its first ``ceil(cf*N*K/E)`` assignments in
token order and drops the rest (their weight is lost, the residual carries them).
Loads are counted before dropping. Expert weights are stacked into single
``[E, ...]`` parameters so that every expert has a gradient (zero when unused),
which data-parallel engines require.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from train.model.config import MoEConfig
from train.model.mlp import SwiGLU


class MoE(nn.Module):
    def __init__(self, hidden_size: int, cfg: MoEConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        E, I = cfg.num_experts, cfg.expert_size
        self.router = nn.Linear(hidden_size, E, bias=False)
        self.w_gate = nn.Parameter(torch.empty(E, I, hidden_size))
        self.w_up = nn.Parameter(torch.empty(E, I, hidden_size))
        self.w_down = nn.Parameter(torch.empty(E, hidden_size, I))
        self.shared = SwiGLU(hidden_size, I * cfg.num_shared_experts) if cfg.num_shared_experts else None
        self.register_buffer("expert_bias", torch.zeros(E))
        self.register_buffer("load_accum", torch.zeros(E), persistent=False)
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        for w in (self.router.weight, self.w_gate, self.w_up):
            nn.init.normal_(w, 0.0, std)
        nn.init.normal_(self.w_down, 0.0, std if out_std is None else out_std)
        with torch.no_grad():
            self.expert_bias.zero_()
            self.load_accum.zero_()

    def _apply(self, fn, recurse=True):
        """Move the balancing state with the module but keep it float32: bias steps of
        ~1e-3 would be rounded away in bfloat16 (``model.to(bfloat16)``, DeepSpeed bf16)."""
        keep = {name: self._buffers[name] for name in ("expert_bias", "load_accum")}
        super()._apply(fn, recurse)
        for name, old in keep.items():
            new = self._buffers[name]
            self._buffers[name] = new.float() if old.is_meta else old.to(device=new.device, dtype=torch.float32)
        return self

    # ---------------------------------------------------------------- routing
    def route(self, x2d: torch.Tensor, batch: int):
        """``x2d [N, C]`` (``N = batch * T``) -> top-k ``idx [N,K]``, ``weights [N,K]`` fp32,
        ``aux_loss []`` (balance + z-loss) and per-expert ``load [E]`` (before dropping)."""
        cfg, E, K = self.cfg, self.cfg.num_experts, self.cfg.top_k
        logits = F.linear(x2d.float(), self.router.weight.float())
        scores = logits.softmax(-1) if cfg.score_func == "softmax" else logits.sigmoid()
        select_on = scores + self.expert_bias if cfg.bias_update_rate > 0 else scores
        idx = select_on.topk(K, dim=-1).indices
        weights = scores.gather(1, idx)
        if cfg.normalize_topk:
            weights = weights / weights.sum(-1, keepdim=True).clamp_min(1e-20)
        weights = weights * cfg.route_scale
        load = torch.bincount(idx.flatten(), minlength=E)

        aux = logits.new_zeros(())
        if cfg.aux_loss_coef > 0 and cfg.aux_loss_type != "none":
            probs = scores if cfg.score_func == "softmax" else scores / scores.sum(-1, keepdim=True)
            chosen = torch.zeros_like(probs).scatter_(1, idx, 1.0)
            if cfg.aux_loss_type == "seq":
                chosen, probs = chosen.view(batch, -1, E), probs.view(batch, -1, E)
                f = chosen.mean(1) * (E / K)
                aux = aux + cfg.aux_loss_coef * (f * probs.mean(1)).sum(-1).mean()
            else:
                f = chosen.mean(0) * (E / K)
                aux = aux + cfg.aux_loss_coef * (f * probs.mean(0)).sum()
        if cfg.z_loss_coef > 0:
            aux = aux + cfg.z_loss_coef * logits.logsumexp(-1).square().mean()
        return idx, weights, aux, load

    def capacity(self, num_tokens: int) -> int | None:
        cf = self.cfg.capacity_factor
        return None if cf is None else math.ceil(cf * num_tokens * self.cfg.top_k / self.cfg.num_experts)

    # --------------------------------------------------------------- forward
    def forward(self, x: torch.Tensor):
        B, T, C = x.shape
        x2d = x.reshape(B * T, C)
        idx, weights, aux, load = self.route(x2d, B)
        K = self.cfg.top_k
        order = idx.flatten().argsort(stable=True)
        token = order // K
        w_sorted = weights.flatten()[order].to(x.dtype)
        counts = load.tolist()
        cap = self.capacity(B * T)

        y = torch.zeros_like(x2d)
        start, dropped = 0, 0
        for e, count in enumerate(counts):
            kept = count if cap is None else min(count, cap)
            dropped += count - kept
            if kept:
                sl = slice(start, start + kept)
                h = x2d[token[sl]]
                out = F.linear(F.silu(F.linear(h, self.w_gate[e])) * F.linear(h, self.w_up[e]), self.w_down[e])
                y.index_add_(0, token[sl], out * w_sorted[sl, None])
            start += count
        if self.shared is not None:
            y = y + self.shared(x2d)
        stats = {"load": load.detach(), "dropped": dropped, "assignments": B * T * K, "aux": aux.detach()}
        return y.view(B, T, C), aux, stats

    # ------------------------------------------------------- bias balancing
    @torch.no_grad()
    def record_load(self, load: torch.Tensor) -> None:
        """Accumulate per-expert loads ``[E]`` for the next ``update_bias``."""
        self.load_accum += load.to(self.load_accum)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Auxiliary-loss-free balancing step: ``bias += rate * sign(mean(load) - load)``."""
        rate = self.cfg.bias_update_rate
        if rate > 0 and self.load_accum.sum() > 0:
            load = self.load_accum.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)
            self.expert_bias += rate * torch.sign(load.mean() - load)
        self.load_accum.zero_()


def load_summary(load: torch.Tensor) -> dict[str, float]:
    """Balance of one layer's loads ``[E]``: coefficient of variation and max/mean ratio."""
    load = load.double()
    mean = load.mean().clamp_min(1e-12)
    return {"cv": float(load.std(unbiased=False) / mean), "max_over_mean": float(load.max() / mean)}
