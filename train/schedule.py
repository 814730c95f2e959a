"""Learning-rate schedules as pure functions of the optimizer step.

Nothing to checkpoint: a resumed run recomputes the same lr from the step counter.
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, name: str, warmup_steps: int, total_steps: int, min_lr_ratio: float,
          decay_fraction: float) -> float:
    """lr for optimizer step ``step`` (0-based: the update that produces step ``step + 1``).

    Warm-up is linear from ``lr / warmup_steps`` to ``lr``. ``cosine`` then decays to
    ``min_lr_ratio * lr`` at ``total_steps``; ``wsd`` holds ``lr`` and decays linearly over
    the last ``decay_fraction * total_steps`` steps; ``constant`` holds ``lr``.
    """
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    if name == "constant":
        return lr
    if name == "cosine":
        span = max(total_steps - warmup_steps, 1)
        t = min(max(step - warmup_steps, 0) / span, 1.0)
        return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    if name == "wsd":
        decay_steps = int(round(decay_fraction * total_steps))
        start = total_steps - decay_steps
        if decay_steps <= 0 or step < start:
            return lr
        t = min((step - start + 1) / decay_steps, 1.0)
        return lr + (floor - lr) * t
    raise ValueError(f"unknown schedule {name!r}; expected cosine, wsd or constant")


def schedule_from_config(cfg):
    """``step -> lr`` from the ``optim`` and ``schedule`` groups."""
    s = cfg.schedule
    total = int(s.total_steps if s.total_steps is not None else cfg.train.max_steps)
    kw = dict(lr=float(cfg.optim.lr), name=str(s.name), warmup_steps=int(s.warmup_steps), total_steps=total,
              min_lr_ratio=float(s.min_lr_ratio), decay_fraction=float(s.decay_fraction))
    return lambda step: lr_at(step, **kw)
