"""Structured trainer config: the dataclasses behind ``configs/train.yaml``.

Registered in Hydra's ConfigStore as ``train_schema`` (the first entry of the defaults
list), so a misspelt key or a wrong type in any trainer group is a composition error,
not a silent default. The ``model``, ``attention``, ``data`` and ``tokenizer`` groups
belong to other packages and are checked by their own ``from_dict``/``validate`` in
``train.validate``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

SCHEMA_NAME = "train_schema"


@dataclass
class OptimConfig:
    """AdamW (decoupled weight decay on matrices only; norms, biases and gains get none)."""

    name: str = "adamw"
    lr: float = 3e-4
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1


@dataclass
class ScheduleConfig:
    """Learning rate as a pure function of the optimizer step (so resume needs no state).

    ``cosine``: linear warm-up then cosine to ``min_lr_ratio * lr`` at ``total_steps``.
    ``wsd``: warm-up, stable at ``lr``, then linear decay over the last
    ``decay_fraction * total_steps`` steps to ``min_lr_ratio * lr``.
    ``constant``: warm-up then constant.
    """

    name: str = "cosine"
    warmup_steps: int = 100
    total_steps: Optional[int] = None  # None: train.max_steps
    min_lr_ratio: float = 0.1
    decay_fraction: float = 0.2


@dataclass
class DeepSpeedConfig:
    """ZeRO settings turned into the DeepSpeed JSON by ``train.ds_config.build_ds_config``."""

    stage: int = 1
    overlap_comm: bool = False
    contiguous_gradients: bool = True
    reduce_bucket_size: int = 50_000_000
    allgather_bucket_size: int = 50_000_000
    stage3_param_persistence_threshold: int = 100_000
    stage3_max_live_parameters: int = 1_000_000_000
    stage3_prefetch_bucket_size: int = 50_000_000
    offload_optimizer: str = "none"  # none | cpu
    offload_param: str = "none"  # none | cpu (ZeRO-3 only)


@dataclass
class WandbConfig:
    """wandb run settings. ``mode`` offline by default: nothing needs a network or a key."""

    enabled: bool = True
    project: str = "nsa-pretrain"
    entity: Optional[str] = None
    group: Optional[str] = None  # None: the experiment name (one group per comparison)
    job_type: str = "train"
    mode: str = "offline"  # offline | online | disabled
    tags: List[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    log_every: int = 1
    progress_bar: bool = True
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class CheckpointConfig:
    """Checkpoints under ``<run_dir>/checkpoints``; ``on_save_error``: continue | stop."""

    every_steps: int = 500
    keep_last: int = 3
    save_at_end: bool = True
    export_at_end: bool = True
    on_save_error: str = "stop"
    verify: str = "sha256"  # sha256 | size: what resume checks against the manifest


@dataclass
class TrainLoopConfig:
    """Batch arithmetic: ``global_batch_size = micro_batch_size * grad_accum * world_size``."""

    max_steps: int = 1000
    seq_len: int = 2048
    micro_batch_size: int = 1
    grad_accum: int = 1
    global_batch_size: Optional[int] = None  # None: derived; set it to have it checked
    precision: str = "bf16"  # bf16 | fp32
    grad_clip: float = 1.0
    activation_checkpointing: bool = False
    compile: bool = False
    val_every: int = 0  # 0: no validation
    val_batches: int = 4
    max_consecutive_nonfinite: int = 5
    deterministic: bool = False
    # An export dir (or a run dir with export/) whose weights start this run instead of a random
    # init: a curriculum stage, a context extension. Only the weights: optimizer, schedule, data
    # order and step count start afresh. Ignored when the run resumes (its checkpoint has weights).
    init_from: Optional[str] = None
    # With init_from: re-draw (as a fresh init) the embedding rows of the token ids that never occur
    # in the training data of the init_from run. For a stage after one on narrow data (synthetic
    # tasks) on a large vocabulary: with a tied head, Adam drove every id absent there along one
    # shared direction, so the ids this stage needs would start indistinguishable.
    init_redraw_unseen_embeddings: bool = False
    # With init_from: NSA branches whose gates restart at attention.gate_init (e.g. [cmp]) instead of
    # keeping the gates the init_from run learnt; no effect on full attention (no gates).
    init_reset_gates: List[str] = field(default_factory=list)


@dataclass
class DebugConfig:
    """Fault injection for the reliability tests: steps (1-based) whose loss or grads become NaN;
    ``kill_in_save_at_step``: SIGKILL this process while the checkpoint of that step is half written."""

    nan_loss_at_steps: List[int] = field(default_factory=list)
    nan_grad_at_steps: List[int] = field(default_factory=list)
    kill_in_save_at_step: int = 0


@dataclass
class TrainConfig:
    """The whole trainer config. ``run_dir`` is deterministic so that every rank agrees."""

    name: str = "default"
    run_name: str = "${name}-${attention.kind}"
    seed: int = 1234
    output_root: str = "outputs"
    run_dir: str = "${output_root}/runs/${run_name}"
    resume: str = "auto"  # auto | none | <checkpoint dir>
    device: str = "auto"  # auto | cpu | cuda
    model: Any = None
    attention: Any = None
    data: Any = None
    tokenizer: Any = None
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    debug: DebugConfig = field(default_factory=DebugConfig)


def register() -> None:
    """Store the schema so ``configs/train.yaml`` can list it first in its defaults."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=TrainConfig)
