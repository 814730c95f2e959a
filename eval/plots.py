"""Figures (matplotlib, Agg backend): NIAH heatmaps, loss curves, position-wise loss, score bars.

Every function writes one PNG and returns its path; inputs are plain Python data.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _draw_heatmap(ax, grid: Sequence[Sequence[float]], lengths: Sequence[int], depths: Sequence[float], title: str):
    """grid[length_index][depth_index] in [0, 1]; x: context length, y: depth."""
    import numpy as np

    data = np.asarray(grid, dtype=float).T  # [depth, length]
    im = ax.imshow(data, cmap="RdYlGn", vmin=0.0, vmax=1.0, aspect="auto", origin="upper")
    ax.set_xticks(range(len(lengths)), [f"{L // 1024}k" if L >= 1024 else str(L) for L in lengths])
    ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    ax.set_title(title)
    for i in range(data.shape[0]):
        for j in range(data.shape[1]):
            ax.text(j, i, f"{data[i, j]:.2f}", ha="center", va="center", fontsize=6)
    return im


def niah_heatmap(grid, lengths, depths, path: Path, title: str = "needle in a haystack") -> Path:
    """One depth x length accuracy heatmap."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(lengths), 1.0 + 0.4 * len(depths)))
    im = _draw_heatmap(ax, grid, lengths, depths, title)
    fig.colorbar(im, ax=ax, label="accuracy")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def niah_heatmaps_side_by_side(panels: Mapping[str, Mapping], path: Path) -> Path:
    """Heatmaps of several runs next to each other; panels[name] is a NIAH results.json dict."""
    plt = _plt()
    n = len(panels)
    if n == 0:
        raise ValueError("no NIAH results to plot")
    first = next(iter(panels.values()))
    w = 1.0 + 0.8 * len(first["context_lengths"])
    fig, axes = plt.subplots(1, n, figsize=(w * n + 1.0, 1.4 + 0.4 * len(first["depths"])), squeeze=False,
                             constrained_layout=True)
    im = None
    for k, (ax, (name, res)) in enumerate(zip(axes[0], panels.items(), strict=True)):
        im = _draw_heatmap(ax, res["score"], res["context_lengths"], res["depths"], f"{name} ({res['needle']})")
        if k:  # depth axis labelled once, on the left
            ax.set_ylabel("")
            ax.tick_params(labelleft=False)
    fig.colorbar(im, ax=list(axes[0]), label="accuracy")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def line_plot(series: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: Path, xlabel: str, ylabel: str,
              title: str = "", logx: bool = False) -> Path:
    """Several named (x, y) curves on one axis (loss curves, loss by position)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for name, (x, y) in series.items():
        ax.plot(list(x), list(y), label=name, marker="." if len(x) < 40 else None)
    if logx:
        ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if series:
        ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def grouped_bars(groups: Sequence[str], values: Mapping[str, Sequence[float | None]], path: Path, ylabel: str,
                 title: str = "") -> Path:
    """Bars per group (e.g. LongBench category) for each named run; None is drawn as 0."""
    import numpy as np

    plt = _plt()
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(groups) * max(1, len(values))), 4.0))
    width = 0.8 / max(1, len(values))
    x = np.arange(len(groups))
    for k, (name, vals) in enumerate(values.items()):
        ax.bar(x + k * width, [v or 0.0 for v in vals], width, label=name)
    ax.set_xticks(x + 0.4 - width / 2, list(groups), rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
