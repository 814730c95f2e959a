"""``python -m train [overrides]`` and ``torchrun --nproc_per_node=N -m train [overrides]``.

Hydra composes ``configs/train.yaml``; ``-m attention=nsa,full`` runs one job per
attention kind (same seed and data order, one wandb group). See ``train.trainer`` for
the exit codes.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = str(Path(__file__).resolve().parents[1] / "configs")


def main() -> None:
    import hydra

    from train.config import register

    register()
    codes = []

    @hydra.main(config_path=CONFIG_DIR, config_name="train", version_base="1.3")
    def _app(cfg) -> int:
        from train.trainer import run

        code = run(cfg)
        codes.append(code)
        return code

    _app()
    # No codes: the jobs ran in other processes (submitit launcher), which report on their own
    # (each run's status.json; a job that raised is re-raised here by the launcher).
    sys.exit(max(codes) if codes else 0)


if __name__ == "__main__":
    main()
