"""Hydra composition for the data CLIs (``python -m data.tokenizer`` / ``python -m data.prepare``).

The groups live in ``configs/data/`` and ``configs/tokenizer/``; the primary config is
registered here in Hydra's ConfigStore, so the commands take the same overrides as the
trainer (``data=pystdlib tokenizer=bpe4096 data.num_proc=4``) without a Hydra run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PRIMARY = "data_cli"


def compose(argv: list[str] | None, prog: str, description: str, extra: dict | None = None):
    """Compose ``{data, tokenizer, **extra}`` from the config groups and ``key=value`` overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.config_store import ConfigStore
    from hydra.core.global_hydra import GlobalHydra

    argv = list(sys.argv[1:] if argv is None else argv)
    if any(a in ("-h", "--help") for a in argv):
        groups = {g: sorted(p.stem for p in (CONFIG_DIR / g).glob("*.yaml")) for g in ("data", "tokenizer")}
        print(f"usage: {prog} [data=NAME] [tokenizer=NAME] [key=value ...]\n\n{description}\n")
        for g, names in groups.items():
            print(f"  {g}: {', '.join(names)}")
        raise SystemExit(0)
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SystemExit(f"{prog}: expected key=value overrides, got {bad}")
    ConfigStore.instance().store(name=PRIMARY, node={
        "defaults": ["_self_", {"data": "pystdlib"}, {"tokenizer": "bpe4096"}], **(extra or {})})
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name=PRIMARY, overrides=argv)
