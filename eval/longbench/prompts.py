"""LongBench prompt construction and middle truncation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def build_prompt(template: str, sample: Mapping) -> str:
    """Fill the task template's ``{context}`` and ``{input}`` fields from a benchmark sample."""
    for key in ("context", "input"):
        if "{" + key + "}" in template and key not in sample:
            raise ValueError(f"sample has no {key!r} field required by the prompt template")
    return template.format(context=sample.get("context", ""), input=sample.get("input", ""))


def truncate_middle(ids: Sequence[int], max_length: int) -> list[int]:
    """Keep the first and last ``max_length // 2`` tokens of an over-long prompt.

    The instruction sits at both ends of every LongBench prompt, so cutting the
    middle of the context keeps the task readable. Prompts that fit are unchanged.
    """
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    ids = list(ids)
    if len(ids) <= max_length:
        return ids
    half = max_length // 2
    return ids[:half] + ids[len(ids) - half:]
