"""Config validation before any rank starts work.

``validate(cfg, world_size, device)`` collects every problem as one line and raises a
single ``ConfigError`` listing them, so a bad run fails in a second with a readable
message instead of a traceback from inside DeepSpeed or a kernel. It writes nothing.
"""

from __future__ import annotations

from pathlib import Path

# Largest model (parameters) the trainer agrees to run on a CPU: beyond this a step
# takes minutes and the fp32 Adam state alone is > 16 GB.
CPU_MAX_PARAMS = 1_000_000_000

SCHEDULES = ("cosine", "wsd", "constant")


class ConfigError(ValueError):
    """One or more invalid config values; ``problems`` holds one message per problem."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("invalid config:\n" + "\n".join(f"  - {p}" for p in self.problems))


def _plain(node):
    from omegaconf import DictConfig, OmegaConf

    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return dict(node) if node is not None else None


def _model_problems(cfg, problems: list[str]):
    """Model and attention configs through their own ``from_dict`` + ``validate``."""
    from train.model import AttentionConfig, ModelConfig

    model_cfg = attn_cfg = None
    for key, cls in (("model", ModelConfig), ("attention", AttentionConfig)):
        raw = _plain(cfg.get(key))
        if raw is None:
            problems.append(f"{key}: missing (choose one with {key}=<name>)")
            continue
        try:
            obj = cls.from_dict(raw)
            obj.validate()
        except (ValueError, TypeError) as e:
            problems.append(str(e))
            continue
        if key == "model":
            model_cfg = obj
        else:
            attn_cfg = obj
    return model_cfg, attn_cfg


def _shape_problems(cfg, model_cfg, attn_cfg, problems: list[str]) -> None:
    """Sequence length against the model and the NSA block settings."""
    T = int(cfg.train.seq_len)
    if T < 2:
        problems.append(f"train.seq_len={T} must be >= 2")
    if model_cfg is not None and T > model_cfg.max_seq_len:
        problems.append(f"train.seq_len={T} exceeds model.max_seq_len={model_cfg.max_seq_len}")
    if attn_cfg is None or attn_cfg.kind != "nsa":
        return
    if attn_cfg.block_len > T:
        problems.append(f"attention.block_len l={attn_cfg.block_len} is longer than train.seq_len={T}: "
                        "no compressed block would ever be complete")
    if attn_cfg.select_len > T:
        problems.append(f"attention.select_len l'={attn_cfg.select_len} is longer than train.seq_len={T}")
    if model_cfg is not None and attn_cfg.window > model_cfg.max_seq_len:
        problems.append(f"attention.window w={attn_cfg.window} is larger than the context "
                        f"model.max_seq_len={model_cfg.max_seq_len}")


def _batch_problems(cfg, world_size: int, problems: list[str]) -> None:
    t = cfg.train
    for name in ("micro_batch_size", "grad_accum", "max_steps"):
        if int(t[name]) < 1:
            problems.append(f"train.{name} must be >= 1, got {t[name]}")
    if t.global_batch_size is not None:
        want = int(t.micro_batch_size) * int(t.grad_accum) * world_size
        if int(t.global_batch_size) != want:
            problems.append(
                f"train.global_batch_size={t.global_batch_size} != micro_batch_size {t.micro_batch_size} "
                f"x grad_accum {t.grad_accum} x world_size {world_size} = {want}")
    if t.precision not in ("bf16", "fp32"):
        problems.append(f"train.precision must be 'bf16' or 'fp32', got {t.precision!r}")
    if t.grad_clip < 0:
        problems.append(f"train.grad_clip must be >= 0 (0: off), got {t.grad_clip}")
    if t.val_every < 0 or t.val_batches < 1:
        problems.append("train.val_every must be >= 0 and train.val_batches >= 1")
    if t.max_consecutive_nonfinite < 1:
        problems.append(f"train.max_consecutive_nonfinite must be >= 1, got {t.max_consecutive_nonfinite}")


def _optim_problems(cfg, problems: list[str]) -> None:
    o, s, ds, ck = cfg.optim, cfg.schedule, cfg.deepspeed, cfg.checkpoint
    if o.name != "adamw":
        problems.append(f"optim.name must be 'adamw', got {o.name!r}")
    if o.lr <= 0 or not (0 <= o.beta1 < 1 and 0 <= o.beta2 < 1) or o.eps <= 0 or o.weight_decay < 0:
        problems.append(f"optim: need lr > 0, betas in [0, 1), eps > 0, weight_decay >= 0; got lr={o.lr} "
                        f"betas=({o.beta1}, {o.beta2}) eps={o.eps} weight_decay={o.weight_decay}")
    if s.name not in SCHEDULES:
        problems.append(f"schedule.name must be one of {SCHEDULES}, got {s.name!r}")
    total = s.total_steps if s.total_steps is not None else cfg.train.max_steps
    if s.warmup_steps < 0 or s.warmup_steps > total:
        problems.append(f"schedule.warmup_steps={s.warmup_steps} must be in [0, total_steps={total}]")
    if not 0 <= s.min_lr_ratio <= 1 or not 0 <= s.decay_fraction <= 1:
        problems.append("schedule.min_lr_ratio and schedule.decay_fraction must be in [0, 1]")
    if ds.stage not in (0, 1, 2, 3):
        problems.append(f"deepspeed.stage must be 0, 1, 2 or 3, got {ds.stage}")
    if ds.offload_optimizer not in ("none", "cpu") or ds.offload_param not in ("none", "cpu"):
        problems.append("deepspeed.offload_optimizer / offload_param must be 'none' or 'cpu'")
    if ds.offload_param == "cpu" and ds.stage != 3:
        problems.append("deepspeed.offload_param=cpu needs deepspeed.stage=3")
    if ck.every_steps < 0 or ck.keep_last < 1:
        problems.append(f"checkpoint.every_steps must be >= 0 and keep_last >= 1, got {ck.every_steps}, "
                        f"{ck.keep_last}")
    if ck.on_save_error not in ("stop", "continue"):
        problems.append(f"checkpoint.on_save_error must be 'stop' or 'continue', got {ck.on_save_error!r}")
    if ck.verify not in ("sha256", "size"):
        problems.append(f"checkpoint.verify must be 'sha256' or 'size', got {ck.verify!r}")
    if cfg.logging.wandb.mode not in ("offline", "online", "disabled"):
        problems.append(f"logging.wandb.mode must be offline, online or disabled, got {cfg.logging.wandb.mode!r}")


def _device_problems(cfg, device: str, model_cfg, attn_cfg, problems: list[str]) -> None:
    if cfg.device not in ("auto", "cpu", "cuda"):
        problems.append(f"device must be auto, cpu or cuda, got {cfg.device!r}")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            problems.append("device=cuda but no CUDA device is available")
        return
    if model_cfg is None or attn_cfg is None:
        return
    from train.model import count_parameters

    n = count_parameters(model_cfg, attn_cfg)["total"]
    if n > CPU_MAX_PARAMS:
        problems.append(f"model has {n / 1e9:.1f}B parameters; training it on a CPU is refused "
                        f"(limit {CPU_MAX_PARAMS / 1e9:.0f}B): use a GPU or a smaller model=")


def _tokenizer_problems(cfg, model_cfg, problems: list[str]) -> None:
    """The tokenizer's ids must all be rows of the embedding."""
    tok = _plain(cfg.get("tokenizer"))
    if tok is None or model_cfg is None:
        return
    size = tok.get("vocab_size")
    path = tok.get("path") or str(Path("outputs/tokenizers") / f"{tok.get('name')}.model")
    if Path(path).is_file():
        from data.tokenizer import Tokenizer

        size = Tokenizer(path).vocab_size
    if size is not None and int(size) > model_cfg.vocab_size:
        problems.append(f"tokenizer {tok.get('name')} has {size} ids but model.vocab_size={model_cfg.vocab_size}: "
                        "token ids would index past the embedding")


def _resume_problems(cfg, problems: list[str]) -> None:
    r = str(cfg.resume)
    if r not in ("auto", "none") and not Path(r).is_dir():
        problems.append(f"resume={r!r} is neither 'auto', 'none' nor an existing checkpoint directory")
    init = cfg.train.get("init_from")
    if init:
        from train.model.pretrained import resolve_export

        try:
            resolve_export(init)
        except ValueError as e:
            problems.append(f"train.init_from: {e}")
    gates = list(cfg.train.get("init_reset_gates") or [])
    if gates:
        from nsa.ops.common import BRANCHES

        if not init:
            problems.append("train.init_reset_gates restarts gates of the weights train.init_from loads: set init_from")
        unknown = sorted(set(gates) - set(BRANCHES))
        if unknown:
            problems.append(f"train.init_reset_gates: unknown branches {unknown}, expected some of {', '.join(BRANCHES)}")
    for key in ("nan_loss_at_steps", "nan_grad_at_steps"):
        if any(int(s) < 1 for s in cfg.debug[key]):
            problems.append(f"debug.{key} holds steps < 1 (steps are 1-based)")


def validate(cfg, world_size: int, device: str) -> None:
    """Raise ``ConfigError`` with one line per problem; return None when the config is runnable."""
    problems: list[str] = []
    if world_size < 1:
        problems.append(f"world_size must be >= 1, got {world_size}")
    model_cfg, attn_cfg = _model_problems(cfg, problems)
    _shape_problems(cfg, model_cfg, attn_cfg, problems)
    _batch_problems(cfg, max(world_size, 1), problems)
    _optim_problems(cfg, problems)
    _device_problems(cfg, device, model_cfg, attn_cfg, problems)
    _tokenizer_problems(cfg, model_cfg, problems)
    _resume_problems(cfg, problems)
    if problems:
        raise ConfigError(problems)
