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
    raise ValueError(
        f"checkpoint {str(path)!r} is neither an export dir (with {', '.join(EXPORT_FILES)}) "
        "nor a run dir with an export/ subdirectory"
    )


def run_wandb_group(run_dir: Path | None) -> str | None:
    """The wandb group recorded in the run's config.yaml (``wandb.group``), if any."""
    if run_dir is None or not (run_dir / "config.yaml").is_file():
        return None
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    group = OmegaConf.select(cfg, "wandb.group", default=None)
    return str(group) if group else None
