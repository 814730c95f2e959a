"""``python -m eval task=niah|longbench|mmlu|ppl|general checkpoint=PATH [task overrides]``.

Config: configs/eval.yaml, with each task's settings under its name (configs/eval/<task>.yaml),
e.g. ``niah.context_lengths=[4096,8192] niah.needle=multikey`` or ``longbench.subset=all``.
"""

from __future__ import annotations


def _rename_checkpoint(argv: list[str]) -> list[str]:
    """``checkpoint=X`` -> ``checkpoint_path=X``: configs/checkpoint/ is the trainer's config group,
    so Hydra would read a ``checkpoint`` override as a group choice."""
    return ["checkpoint_path=" + a.split("=", 1)[1] if a.startswith("checkpoint=") else a for a in argv]


def main() -> None:
    import sys

    import hydra

    sys.argv = sys.argv[:1] + _rename_checkpoint(sys.argv[1:])

    @hydra.main(version_base="1.3", config_path="../configs", config_name="eval")
    def _app(cfg) -> None:
        from eval.app import run_task

        run_task(cfg)

    _app()


if __name__ == "__main__":
    main()
