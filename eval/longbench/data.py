"""Loading LongBench samples: a local directory of the benchmark's jsonl files, or the hub.

Sample fields (the benchmark's format): ``input``, ``context``, ``answers`` (list),
``length`` (words), ``dataset``, ``language``, ``all_classes`` (list or null), ``_id``.
"""

from __future__ import annotations

import json
from pathlib import Path

REQUIRED_FIELDS = ("input", "context", "answers")


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
    return rows


def _hub_dir(source: str) -> Path:
    """Download and unpack the benchmark's data.zip once (the hub repo ships no parquet)."""
    import zipfile

    from huggingface_hub import hf_hub_download

    archive = Path(hf_hub_download(source, "data.zip", repo_type="dataset"))
    target = archive.parent / "longbench_data"
    if not target.is_dir():
        with zipfile.ZipFile(archive) as z:
            z.extractall(target)
    found = sorted(target.rglob("narrativeqa.jsonl"))
    if not found:
        raise ValueError(f"{archive} has no narrativeqa.jsonl; not a LongBench archive")
    return found[0].parent


def _from_datasets(source: str, name: str) -> list[dict] | None:
    """``datasets.load_dataset(source, name)``; None when this datasets version cannot build it."""
    try:
        from datasets import load_dataset

        ds = load_dataset(source, name, split="test")
    except Exception:  # script-based hub repos are refused by datasets >= 4; fall back to data.zip
        return None
    return [dict(r) for r in ds]


def load_task_samples(task: str, data_dir: str | Path | None = None, longbench_e: bool = False,
                      source: str = "THUDM/LongBench", limit: int | None = None) -> list[dict]:
    """Samples of one task: ``<data_dir>/<task>[_e].jsonl``, else the hub copy of ``source``."""
    name = f"{task}_e" if longbench_e else task
    if data_dir is None:
        rows = _from_datasets(source, name)
        if rows is not None:
            return rows[:limit] if limit else rows
        data_dir = _hub_dir(source)
    path = Path(data_dir) / f"{name}.jsonl"
    if not path.is_file():
        raise ValueError(f"LongBench file {path} not found (data_dir={str(data_dir)!r}, task={name!r})")
    rows = _read_jsonl(path)
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(f"{path} sample {i} lacks fields {missing}")
        if isinstance(row["answers"], str):
            row["answers"] = [row["answers"]]
    return rows[:limit] if limit else rows
