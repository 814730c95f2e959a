"""Resolve a ``checkpoint=`` argument: an export dir, or a run dir (use its export/).

An export dir holds ``model.safetensors``, ``config.json`` and ``tokenizer.model``
(written by ``train.model.save_pretrained``); a run dir holds ``metrics.jsonl``,
``config.yaml`` and ``export/``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

EXPORT_FILES = ("model.safetensors", "config.json", "tokenizer.model")


@dataclass
class CheckpointInfo:
    export_dir: Path
    run_dir: Path | None
    name: str


def is_export_dir(path: Path) -> bool:
    return all((path / f).is_file() for f in EXPORT_FILES)


def resolve_checkpoint(path: str | Path) -> CheckpointInfo:
    """Find the export dir, the run dir it came from (if any) and a short name for outputs."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"checkpoint path {str(path)!r} does not exist")
    if is_export_dir(path):
        parent = path.parent
        run_dir = parent if (parent / "metrics.jsonl").is_file() or (parent / "config.yaml").is_file() else None
        name = parent.name if run_dir is not None and path.name == "export" else path.name
        return CheckpointInfo(path.resolve(), run_dir.resolve() if run_dir else None, name)
    if is_export_dir(path / "export"):
        return CheckpointInfo((path / "export").resolve(), path.resolve(), path.resolve().name)
    export = path / "export" if (path / "export").is_dir() else path
    missing = [f for f in EXPORT_FILES if not (export / f).is_file()]
    raise ValueError(
        f"checkpoint {str(path)!r} is neither an export dir (with {', '.join(EXPORT_FILES)}) "
        f"nor a run dir with an export/ subdirectory: {str(export)!r} lacks {', '.join(missing)}"
    )


def run_config(run_dir: Path | None):
    """The run's saved config.yaml as a DictConfig (None without one)."""
    if run_dir is None or not (Path(run_dir) / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    return OmegaConf.load(Path(run_dir) / "config.yaml")


def _select(cfg, *keys):
    from omegaconf import OmegaConf

    for key in keys:
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if value not in (None, ""):
            return value
    return None


def run_wandb_group(run_dir: Path | None) -> str | None:
    """The run's wandb group: ``logging.wandb.group`` (or ``wandb.group``), else the experiment ``name``."""
    cfg = run_config(run_dir)
    if cfg is None:
        return None
    group = _select(cfg, "logging.wandb.group", "wandb.group", "name")
    return str(group) if group is not None else None


def run_wandb_project(run_dir: Path | None) -> str | None:
    cfg = run_config(run_dir)
    project = _select(cfg, "logging.wandb.project", "wandb.project") if cfg is not None else None
    return str(project) if project is not None else None


def run_data_dir(run_dir: Path | None) -> Path | None:
    """Where ``data.prepare`` wrote the run's shards: ``data.out_dir`` or outputs/data/<data>-<tokenizer>."""
    cfg = run_config(run_dir)
    if cfg is None:
        return None
    out = _select(cfg, "data.out_dir")
    if out is not None:
        return Path(str(out))
    data, tok = _select(cfg, "data.name"), _select(cfg, "tokenizer.name")
    return Path("outputs/data") / f"{data}-{tok}" if data is not None and tok is not None else None


def run_data_mismatch(run_dir: Path | None, data_dir: Path) -> str | None:
    """Why ``data_dir`` no longer holds the preparation of the run's data config (``data.prepare``
    replaced it with another config's, e.g. another validation split), or None (also when the run
    config has no complete data config to compare with)."""
    cfg = run_config(run_dir)
    if cfg is None or _select(cfg, "data.source") is None:
        return None
    from omegaconf import OmegaConf

    from data.prepare import stale_preparation
    from data.sources import data_config_from_dict

    try:
        dcfg = data_config_from_dict(OmegaConf.to_container(cfg.data, resolve=True))
    except (ValueError, TypeError):
        return None
    return stale_preparation(Path(data_dir), dcfg)
