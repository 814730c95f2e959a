"""Helpers shared by the benchmark scripts: timing, peak memory, tables and JSON output.

* :func:`measure` runs a callable and returns its wall time, process CPU time and peak
  memory. On CPU the peak is the rise of the process's resident set (Linux ``VmHWM``, reset
  through ``/proc/self/clear_refs`` before the call) over the resident set just before it,
  so it counts every page the call touched, whatever allocated it. On CUDA it is
  ``torch.cuda.max_memory_allocated`` over the allocation before the call.
* :func:`print_table` prints rows of dicts with ``rich``; :func:`write_json` writes the
  results with the machine and library versions.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch


def _status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def measure(fn, device: torch.device | str = "cpu") -> dict:
    """Run ``fn()`` once: ``{"wall_s", "cpu_s", "peak_mb"}`` (``peak_mb`` None if unknown)."""
    device = torch.device(device)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        base = _status_kb("VmRSS") if _reset_peak_rss() else None
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    if device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    else:
        hwm = _status_kb("VmHWM")
        peak = (hwm - base) / 1024 if base is not None and hwm is not None else None
    return {"wall_s": wall, "cpu_s": cpu, "peak_mb": peak}


def best_of(fn, repeats: int, device: torch.device | str = "cpu") -> dict:
    """:func:`measure` ``repeats`` times, summarised by :func:`best`."""
    return best([measure(fn, device) for _ in range(max(1, repeats))])


def best(runs: list[dict]) -> dict:
    """Several :func:`measure` results: the lowest wall and CPU time (least disturbed by other
    work on a shared machine) and the highest peak memory, plus every run."""
    peaks = [r["peak_mb"] for r in runs if r["peak_mb"] is not None]
    return {
        "wall_s": min(r["wall_s"] for r in runs),
        "cpu_s": min(r["cpu_s"] for r in runs),
        "peak_mb": max(peaks) if peaks else None,
        "runs": runs,
    }


def environment() -> dict:
    """Machine and library versions, stored with every result."""
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    if torch.cuda.is_available():
        env["gpu"] = torch.cuda.get_device_name()
    return env


def write_json(path: str | Path, payload: dict) -> Path:
    """Write ``payload`` (plus ``environment()``) as indented JSON, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({**payload, "environment": environment()}, indent=2) + "\n")
    return path


def fmt(x, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def print_table(title: str, columns: list[str], rows: list[list]) -> None:
    """Print ``rows`` (lists of already formatted cells) under ``columns`` with rich."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title)
    for i, c in enumerate(columns):
        table.add_column(c, justify="left" if i == 0 else "right")
    for r in rows:
        table.add_row(*[str(x) for x in r])
    console = Console()
    Console(width=max(console.width, 150)).print(table)  # a pipe reports 80 columns
