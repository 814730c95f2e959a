"""LongBench (Bai et al., 2023): 21 long-context tasks, prompts and metrics as config data."""

from eval.longbench.data import load_task_samples
from eval.longbench.prompts import build_prompt, truncate_middle
from eval.longbench.runner import run_longbench, score_task

__all__ = ["build_prompt", "load_task_samples", "run_longbench", "score_task", "truncate_middle"]
