"""Evaluation harnesses for exported checkpoints: needle in a haystack (niah), LongBench,
MMLU, held-out perplexity by position (ppl), the lm-eval adapter, and eval.compare reports.

Heavy dependencies (hydra, datasets, lm_eval, wandb, matplotlib) are imported by the
functions that need them, so ``import eval`` stays light.
"""
