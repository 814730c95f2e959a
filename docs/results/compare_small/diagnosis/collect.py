"""Collect the compare_small diagnosis runs into table.md and runs.json (run from the repo root).

    python docs/results/compare_small/diagnosis/collect.py RUN_DIR:EVAL_DIR ...

Each RUN_DIR is a finished ``python -m train`` run (its Hydra overrides and metrics.jsonl) and
EVAL_DIR the ``python -m eval task=retrieval`` output for it (``<EVAL_DIR>/retrieval/results.json``).
The table lists, per run, the overrides that differ from the first run's experiment, the steps,
the last validation loss and the held-out retrieval scores, exact (per token).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml

OUT = Path(__file__).resolve().parent
SKIP = ("run_name=", "data.name=", "logging.", "checkpoint.", "train.val_every=")


def one(run_dir: Path, eval_dir: Path) -> dict:
    overrides = yaml.safe_load((run_dir / "hydra/rank0/.hydra/overrides.yaml").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    val = [r["val/loss"] for r in rows if r.get("val/loss") is not None]
    res = json.loads((eval_dir / "retrieval/results.json").read_text())["results"]
    return {"run": run_dir.name, "overrides": [o for o in overrides if not o.startswith(SKIP)],
            "steps": max(r["step"] for r in rows), "val_loss": val[-1] if val else None,
            "retrieval": {t: {"exact": r["exact"], "per_token": r["token_acc"], "documents": r["documents"]}
                          for t, r in res.items()}}


def main(argv: list[str]) -> None:
    runs = [one(Path(a), Path(b)) for a, b in (x.split(":") for x in argv)]
    tasks = ["copy", "mqar", "passkey"]
    lines = ["| run | overrides | steps | val loss | " + " | ".join(tasks) + " |",
             "|---|---|---|---|" + "---|" * len(tasks)]
    for r in runs:
        cells = [f"{r['retrieval'][t]['exact']:.3f} ({r['retrieval'][t]['per_token']:.3f})" if t in r["retrieval"]
                 else "-" for t in tasks]
        lines.append(f"| {r['run']} | {' '.join(r['overrides'])} | {r['steps']} | {r['val_loss']:.3f} | "
                     + " | ".join(cells) + " |")
    (OUT / "table.md").write_text("\n".join(lines) + "\n")
    (OUT / "runs.json").write_text(json.dumps(runs, indent=1) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
