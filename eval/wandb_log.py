"""Logging an evaluation to wandb: scalars, tables and images, in the training run's group."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def flatten_scalars(obj, prefix: str = "") -> dict[str, float]:
    """Every int/float leaf of nested dicts as 'a/b/c' -> value (lists and strings skipped)."""
    out: dict[str, float] = {}
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            out.update(flatten_scalars(v, f"{prefix}/{k}" if prefix else str(k)))
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        out[prefix] = float(obj)
    return out


def log_eval(wcfg: Mapping, *, name: str, task: str, group: str | None, project: str | None,
             scalars: Mapping[str, float], tables: Mapping[str, tuple[Sequence[str], Sequence[Sequence]]],
             images: Mapping[str, Path], out_dir: Path, config: Mapping | None = None) -> str | None:
    """One wandb run ``eval-<name>-<task>`` (job_type eval) in ``group``; returns its local dir."""
    import wandb

    run = wandb.init(project=wcfg.get("project") or project or "nsa-pretrain", entity=wcfg.get("entity"),
                     group=wcfg.get("group") or group, name=f"eval-{name}-{task}", job_type="eval",
                     mode=wcfg.get("mode", "offline"), dir=str(out_dir), config=dict(config or {}),
                     tags=["eval", task], reinit="finish_previous")
    try:
        payload = {f"eval/{task}/{k}": v for k, v in scalars.items()}
        for key, (columns, rows) in tables.items():
            payload[f"eval/{task}/{key}"] = wandb.Table(columns=list(columns), data=[list(r) for r in rows])
        for key, path in images.items():
            payload[f"eval/{task}/{key}"] = wandb.Image(str(path))
        run.log(payload)
        run.summary.update({f"eval/{task}/{k}": v for k, v in scalars.items()})
        return run.dir
    finally:
        run.finish()
