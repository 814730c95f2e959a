"""KV-cached autoregressive generation.

``generate(model, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
stop_ids=None, batch_size=None, generator=None) -> list[list[int]]``: the new tokens
of each prompt (the stop token that ended a row is not included), in prompt order.

Each batch is one prefill over the prompts, then one decode step per new token,
through ``model.new_cache``. Rows of different prompt lengths are **grouped by
length** and each group is decoded as its own batch(es): the caches hold one shared
length per batch, and this keeps every row free of padding, so its logits are
exactly those of a forward pass over that row alone (no attention mask or position
shift for left padding is needed in either attention kind). The cost is more,
smaller batches when lengths vary; evaluation prompts of the same task often share
lengths after truncation.
"""

from __future__ import annotations

from collections import defaultdict

import torch


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token ``[B]`` from ``logits [B, V]``: argmax when ``temperature == 0``, else
    sampling from the temperature-scaled distribution restricted to the ``top_k`` most
    likely tokens and to the smallest set with probability mass >= ``top_p``."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() / temperature
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs >= top_p  # mass before this token already reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.no_grad()
def _generate_batch(model, ids: torch.Tensor, max_new_tokens: int, stop: set[int], sample_kw) -> list[list[int]]:
    B, T = ids.shape
    cache = model.new_cache(B, T + max_new_tokens)
    logits = model(ids, cache=cache).logits[:, -1]
    out = [[] for _ in range(B)]
    done = [False] * B
    for step in range(max_new_tokens):
        nxt = sample_next(logits, **sample_kw)
        for b, tok in enumerate(nxt.tolist()):
            if not done[b]:
                if tok in stop:
                    done[b] = True
                else:
                    out[b].append(tok)
        if all(done) or step == max_new_tokens - 1:
            break
        logits = model(nxt[:, None], cache=cache).logits[:, -1]
    return out


def generate(model, prompts, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_ids=None, batch_size: int | None = None,
             generator: torch.Generator | None = None) -> list[list[int]]:
    """Generate up to ``max_new_tokens`` per prompt (list of token-id lists or ``[B, T]`` tensor)."""
    if isinstance(prompts, torch.Tensor):
        if prompts.dim() != 2:
            raise ValueError(f"prompt tensor must be [B, T], got shape {tuple(prompts.shape)}")
        prompts = prompts.tolist()
    prompts = [list(map(int, p)) for p in prompts]
    if any(len(p) == 0 for p in prompts):
        raise ValueError("every prompt needs at least one token")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    stop = set(stop_ids or [])
    sample_kw = dict(temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    groups = defaultdict(list)
    for i, p in enumerate(prompts):
        groups[len(p)].append(i)
    results: list[list[int] | None] = [None] * len(prompts)
    try:
        for rows in groups.values():
            step = batch_size or len(rows)
            for s in range(0, len(rows), step):
                chunk = rows[s:s + step]
                ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
                for i, toks in zip(chunk, _generate_batch(model, ids, max_new_tokens, stop, sample_kw), strict=True):
                    results[i] = toks
    finally:
        model.train(was_training)
    return results
