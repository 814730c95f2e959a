"""Per-step metrics: JSON lines, wandb and a progress bar, all on rank 0 only.

``<run_dir>/metrics.jsonl`` holds one record per logged step (the eval report reads
loss curves from it); on resume records past the resumed step are dropped, so the file
is the history of the run that survived. wandb runs offline unless told otherwise and
never sees an API key from here: wandb reads it from the environment itself.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

# Dense peak FLOP/s per device (bf16 tensor cores, fp32 without TF32), by name fragment.
PEAK_FLOPS = {
    "H200": (989e12, 67e12),
    "H100": (989e12, 67e12),
    "A100": (312e12, 19.5e12),
    "L40S": (362e12, 91.6e12),
    "A10G": (125e12, 31.2e12),
    "L4": (121e12, 30.3e12),
    "RTX 4090": (165e12, 82.6e12),
    "V100": (125e12, 15.7e12),
}


def peak_flops(device: str, precision: str) -> float | None:
    """Peak FLOP/s of the current device, None when unknown (e.g. CPU)."""
    if device != "cuda":
        return None
    import torch

    name = torch.cuda.get_device_name()
    for frag, (bf16, fp32) in PEAK_FLOPS.items():
        if frag in name:
            return bf16 if precision == "bf16" else fp32
    return None


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1} (for wandb's config table)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def wandb_run_id(project: str, run_name: str) -> str:
    """Deterministic per (project, run name): a resumed job continues the same wandb run."""
    return hashlib.sha256(f"{project}/{run_name}".encode()).hexdigest()[:16]


def _finite_or_none(v):
    return v if not isinstance(v, float) or math.isfinite(v) else None


class MetricsLogger:
    """Rank-0 sink for step metrics; other ranks get a no-op instance (``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool, *, progress_bar: bool, total_steps: int, start_step: int,
                 wandb_cfg=None, run_name: str = "", group: str = "", tags=(), config: dict | None = None,
                 wandb_id: str | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.bar = None
        self.wandb = None
        self.wandb_id = wandb_id
        if not enabled:
            return
        self._truncate(start_step)
        if progress_bar:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc=run_name, unit="step", dynamic_ncols=True)
        if wandb_cfg is not None and wandb_cfg.enabled:
            self._init_wandb(wandb_cfg, run_dir, run_name, group, tags, config)

    def _truncate(self, start_step: int) -> None:
        """Keep the records of steps <= start_step (later ones were lost with their checkpoint)."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text().splitlines():
            try:
                rec = json.loads(line)
            except ValueError:  # a line cut by a kill
                continue
            if rec.get("step", 0) <= start_step:
                keep.append(line)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(x + "\n" for x in keep))
        os.replace(tmp, self.path)

    def _init_wandb(self, wcfg, run_dir, run_name, group, tags, config) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE", wcfg.mode)
        self.wandb_id = self.wandb_id or wandb_run_id(wcfg.project, run_name)
        self.wandb = wandb.init(project=wcfg.project, entity=wcfg.entity, group=group, job_type=wcfg.job_type,
                                name=run_name, id=self.wandb_id, resume="allow", tags=list(tags),
                                config=flatten(config or {}), dir=str(run_dir), mode=mode,
                                settings=wandb.Settings(console="off", x_disable_stats=True))

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        rec = {"step": step, **{k: _finite_or_none(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in metrics.items() if v is not None}, step=step)
        if self.bar is not None and "train/loss" in metrics:
            self.bar.update(step - self.bar.n)
            tps = metrics.get("perf/tokens_per_sec") or 0.0
            self.bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", tok_s=f"{tps:,.0f}")

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
