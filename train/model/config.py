"""Model and attention configuration dataclasses.

Field names follow docs/DESIGN.md; YAML files in ``configs/model`` and
``configs/attention`` hold exactly these keys. Every ``validate()`` raises one
``ValueError`` naming the first problem it finds, so a bad config fails at build
time rather than deep inside a forward pass.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

ROUTER_SCORES = ("softmax", "sigmoid")
AUX_LOSS_KINDS = ("seq", "batch", "none")


def _from_dict(cls, data: dict[str, Any] | None, where: str):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys by name."""
    data = dict(data or {})
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; allowed: {sorted(names)}")
    return cls(**data)


@dataclass
class MoEConfig:
    """DeepSeekMoE settings: ``num_shared_experts`` always-on experts plus
    ``num_experts`` fine-grained routed experts of width ``expert_size``, top-k routed.

    Balancing: ``aux_loss_coef`` with ``aux_loss_type`` "seq" (per sequence, as
    DeepSeek-V3's complementary loss) or "batch" (over all tokens) or "none";
    ``bias_update_rate > 0`` switches on the auxiliary-loss-free bias update.
    ``capacity_factor=None`` is dropless; otherwise an expert keeps at most
    ``ceil(capacity_factor * tokens * top_k / num_experts)`` assignments.
    """

    num_experts: int = 8
    num_shared_experts: int = 1
    top_k: int = 2
    expert_size: int = 256
    score_func: str = "softmax"
    norm_topk: bool | None = None  # None: normalise iff score_func == "sigmoid"
    route_scale: float = 1.0
    capacity_factor: float | None = None
    aux_loss_type: str = "seq"
    aux_loss_coef: float = 1e-3
    bias_update_rate: float = 0.0
    z_loss_coef: float = 0.0

    def validate(self) -> None:
        if self.num_experts < 1:
            raise ValueError(f"moe.num_experts must be >= 1, got {self.num_experts}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"moe.top_k must be in [1, num_experts={self.num_experts}], got {self.top_k}")
        if self.num_shared_experts < 0:
            raise ValueError(f"moe.num_shared_experts must be >= 0, got {self.num_shared_experts}")
        if self.expert_size < 1:
            raise ValueError(f"moe.expert_size must be >= 1, got {self.expert_size}")
        if self.score_func not in ROUTER_SCORES:
            raise ValueError(f"moe.score_func must be one of {ROUTER_SCORES}, got {self.score_func!r}")
        if self.aux_loss_type not in AUX_LOSS_KINDS:
            raise ValueError(f"moe.aux_loss_type must be one of {AUX_LOSS_KINDS}, got {self.aux_loss_type!r}")
        if self.capacity_factor is not None and self.capacity_factor <= 0:
            raise ValueError(f"moe.capacity_factor must be > 0 or null, got {self.capacity_factor}")
        for name in ("aux_loss_coef", "bias_update_rate", "z_loss_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"moe.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def normalize_topk(self) -> bool:
        return self.score_func == "sigmoid" if self.norm_topk is None else bool(self.norm_topk)


@dataclass
class ModelConfig:
    """Decoder-only LM shape. ``rope_scaling`` is None or a YaRN dict
    ``{"type": "yarn", "factor", "original_max_position_embeddings", "beta_fast",
    "beta_slow", "mscale"}`` (see train/model/rope.py)."""

    vocab_size: int = 32000
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    num_kv_heads: int = 4
    head_dim_k: int = 64
    head_dim_v: int = 64
    mlp: str = "swiglu"
    intermediate_size: int = 2048
    moe: MoEConfig = field(default_factory=MoEConfig)
    first_k_dense: int = 0
    tie_embeddings: bool = False
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 8192
    norm_eps: float = 1e-6
    init_std: float = 0.02
    # token embedding init std; None: init_std. A small model needs larger embeddings than its
    # other weights (tiny.yaml: 1/sqrt(hidden_size)) or its look-up heads form late.
    embed_init_std: float | None = None

    def __post_init__(self):
        if isinstance(self.moe, dict):
            self.moe = _from_dict(MoEConfig, self.moe, "model.moe")

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "num_kv_heads",
                     "head_dim_k", "head_dim_v", "intermediate_size", "max_seq_len"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"model.num_heads={self.num_heads} must be divisible by "
                             f"num_kv_heads={self.num_kv_heads} (GQA groups)")
        if self.head_dim_k % 2:
            raise ValueError(f"model.head_dim_k={self.head_dim_k} must be even for RoPE")
        if self.mlp not in ("swiglu", "moe"):
            raise ValueError(f"model.mlp must be 'swiglu' or 'moe', got {self.mlp!r}")
        if not 0 <= self.first_k_dense <= self.num_layers:
            raise ValueError(f"model.first_k_dense must be in [0, num_layers], got {self.first_k_dense}")
        if self.mlp == "moe":
            self.moe.validate()
        if self.init_std <= 0 or self.norm_eps <= 0 or self.rope_theta <= 0:
            raise ValueError("model.init_std, norm_eps and rope_theta must be > 0")
        if self.embed_init_std is not None and self.embed_init_std <= 0:
            raise ValueError(f"model.embed_init_std must be > 0 or null, got {self.embed_init_std}")
        if self.rope_scaling is not None:
            from train.model.rope import validate_rope_scaling

            validate_rope_scaling(self.rope_scaling)

    def is_moe_layer(self, layer: int) -> bool:
        return self.mlp == "moe" and layer >= self.first_k_dense

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        return _from_dict(cls, data, "model")


# NSA settings that choose which keys a query reads, not what any weight computes (the compression,
# block_len / stride, and the selection blocks, select_len, fix what phi and the block scores mean):
# a model may be evaluated (eval.lm.override_attention) or trained on (train.init_from) with others.
SPARSITY_KEYS = ("num_select", "num_init", "num_local", "window")


@dataclass
class AttentionConfig:
    """``kind`` "full" (GQA softmax attention) or "nsa"; the NSA settings use the
    paper's names (l=block_len, d=stride, l'=select_len, n=num_select, w=window)
    and are ignored for "full". ``backend`` None lets ``nsa`` pick (triton on GPU, the fused
    CPU ops for float32 on CPU, else torch)."""

    kind: str = "full"
    block_len: int = 32
    stride: int = 16
    select_len: int = 64
    num_select: int = 16
    num_init: int = 1
    num_local: int = 2
    window: int = 512
    share_kv: bool = False
    compress: str = "mlp"
    compress_hidden: int | None = None
    cmp_rope: str = "tokens"
    backend: str | None = None
    branches: tuple[str, ...] = ("cmp", "slc", "win")  # an ablation keeps fewer, e.g. ["win"]
    # each branch's gate at init, and the gate weight's step scale (None: 1/hidden_size); nsa.layer.NSAConfig
    gate_init: dict[str, float] = field(default_factory=lambda: {"cmp": 0.05, "slc": 0.95, "win": 0.95})
    gate_weight_scale: float | None = None
    select_distill: float = 0.0  # weight of the selection distillation loss (not in the spec); nsa.layer.NSAConfig

    def __post_init__(self) -> None:
        self.branches = tuple(self.branches)  # a list from YAML / config.json compares equal to the default
        self.gate_init = dict(self.gate_init)

    def validate(self) -> None:
        if self.kind not in ("full", "nsa"):
            raise ValueError(f"attention.kind must be 'full' or 'nsa', got {self.kind!r}")
        if self.kind == "full":
            return
        if set(self.gate_init) != {"cmp", "slc", "win"}:
            raise ValueError(f"attention.gate_init must give cmp, slc and win, got {sorted(self.gate_init)}")
        try:  # the NSA settings' rules live in one place: nsa.layer.NSAConfig.validate
            self.nsa_config(_SHAPE_PLACEHOLDER).validate()
        except ValueError as err:
            raise ValueError(f"attention: {err}") from None

    def nsa_config(self, model_cfg: ModelConfig):
        """The ``nsa.layer.NSAConfig`` for one layer of ``model_cfg`` (any kind)."""
        from nsa.layer import NSAConfig

        return NSAConfig(
            hidden_size=model_cfg.hidden_size, num_heads=model_cfg.num_heads,
            num_kv_heads=model_cfg.num_kv_heads, head_dim_k=model_cfg.head_dim_k,
            head_dim_v=model_cfg.head_dim_v, block_len=self.block_len, stride=self.stride,
            select_len=self.select_len, num_select=self.num_select, num_init=self.num_init,
            num_local=self.num_local, window=self.window, share_kv=self.share_kv,
            compress=self.compress, compress_hidden=self.compress_hidden, cmp_rope=self.cmp_rope, backend=self.backend,
            branches=tuple(self.branches),
            gate_init=tuple(float(self.gate_init[b]) for b in ("cmp", "slc", "win")),
            gate_weight_scale=self.gate_weight_scale, select_distill=self.select_distill,
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AttentionConfig:
        return _from_dict(cls, data, "attention")


# The smallest valid layer shape: lets AttentionConfig.validate check the NSA
# settings alone, before the model shape is known.
_SHAPE_PLACEHOLDER = ModelConfig(hidden_size=2, num_heads=1, num_kv_heads=1, head_dim_k=2, head_dim_v=2)
