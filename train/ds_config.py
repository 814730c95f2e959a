"""The DeepSpeed config, built by one pure function from the trainer config.

Every value is explicit (no ``"auto"``), so the ``ds_config.json`` saved with a run is
exactly what the engine ran with.
"""

from __future__ import annotations

from typing import Any


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part] if isinstance(node, dict) else getattr(node, part)
    return node


def build_ds_config(cfg, world_size: int) -> dict[str, Any]:
    """``cfg`` (the trainer config: DictConfig, dataclass or nested dict) -> DeepSpeed dict.

    ``train_batch_size = micro_batch_size * grad_accum * world_size`` (checked earlier by
    ``train.validate``). bf16 keeps DeepSpeed's gradient-overflow check on, so a
    non-finite gradient skips the step under every ZeRO stage that has one (1-3);
    stage 0 is handled by the trainer.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    mb = int(_get(cfg, "train.micro_batch_size"))
    ga = int(_get(cfg, "train.grad_accum"))
    precision = str(_get(cfg, "train.precision"))
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"train.precision must be 'bf16' or 'fp32', got {precision!r}")
    ds = _get(cfg, "deepspeed")
    stage = int(_get(ds, "stage"))
    zero: dict[str, Any] = {
        "stage": stage,
        "overlap_comm": bool(_get(ds, "overlap_comm")),
        "contiguous_gradients": bool(_get(ds, "contiguous_gradients")),
        "reduce_bucket_size": int(_get(ds, "reduce_bucket_size")),
        "allgather_bucket_size": int(_get(ds, "allgather_bucket_size")),
    }
    if stage == 3:
        zero.update({
            "stage3_param_persistence_threshold": int(_get(ds, "stage3_param_persistence_threshold")),
            "stage3_max_live_parameters": int(_get(ds, "stage3_max_live_parameters")),
            "stage3_prefetch_bucket_size": int(_get(ds, "stage3_prefetch_bucket_size")),
            "stage3_gather_16bit_weights_on_model_save": False,
        })
        if str(_get(ds, "offload_param")) == "cpu":
            zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    if str(_get(ds, "offload_optimizer")) == "cpu" and stage >= 1:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {
        "train_batch_size": mb * ga * world_size,
        "train_micro_batch_size_per_gpu": mb,
        "gradient_accumulation_steps": ga,
        "gradient_clipping": float(_get(cfg, "train.grad_clip")),
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16", "check_grad_overflow": True},
        "fp16": {"enabled": False},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        "checkpoint": {"tag_validation": "FAIL"},
    }
