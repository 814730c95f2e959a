"""Retrieval accuracy on held-out synthetic documents (``python -m eval task=retrieval``).

The documents are those the long-context mixtures train on (:mod:`data.synthetic`: passkey,
needle, MQAR, copy), drawn with a seed of their own, so this measures the in-distribution
skill that NIAH then tests at other lengths and in other haystacks. Each document is scored
teacher-forced in one forward pass: an answer counts as retrieved when the argmax prediction
of every one of its tokens is right, which is what greedy decoding of that answer from the
true prefix would produce. Per task it reports the share of answers retrieved (``exact``), of
answer tokens predicted (``token_acc``) and of documents with every answer retrieved
(``doc_exact``), and the same in ``num_buckets`` buckets of document length.

Beside the model's scores, ``lookup_exact`` / ``lookup_token_acc`` are what a perfect one-token
look-up (an ideal induction head: predict the token that followed the latest earlier occurrence of
the current token) scores on the same documents: how far a task is from the match-one-token-and-copy
circuit a small model learns first. Near 1, one such head solves it; far below 1, every answer needs
a match on several tokens (e.g. random letter strings cut into single characters).

NSA models also get ``selection`` per task: for each answer token, the block holding its source
(the token's latest occurrence before the answer) and whether each layer's block selection for
the predicting query, per KV head, holds it; the rates, split by tokens predicted right and wrong,
show where the look-up reads and what a missed selection costs (:func:`selection_summary`). The
same per query head for the blocks that head would pick on its own (:func:`own_head_selection`):
a head that finds the source block which its KV group's summed scores then miss shows the group
outvoting it, a source block no head finds shows the compressed attention not finding it.

Documents are tokenised whole, as in training; an answer's tokens are those that overlap its
characters (a leading-space piece such as "▁word" counts as part of the answer "word").
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from contextlib import contextmanager

import torch

from eval.io import markdown_table

# a task's settings; ``task`` names the generator when the entry's key is a label of its own, e.g.
# ``copy_chars: {task: copy, kwargs: {symbols: chars}}`` beside ``copy``
TASK_KWARGS = ("task", "min_filler_chars", "max_filler_chars", "min_depth", "max_depth", "num_documents", "kwargs")


def documents(task: str, n: int, min_filler: int, max_filler: int, seed: int, kwargs: Mapping | None = None,
              min_depth: float = 0.0, max_depth: float = 1.0, label: str | None = None):
    """``n`` documents of ``task`` with filler lengths uniform in ``[min_filler, max_filler]`` and
    needle depths in ``[min_depth, max_depth]``, from a seed of their own per task (per ``label``
    when given, so two variants of one generator draw different documents)."""
    from data.synthetic import GENERATORS, draw_documents

    if task not in GENERATORS:
        raise ValueError(f"unknown retrieval task {task!r}; known: {sorted(GENERATORS)}")
    return draw_documents(task, n, min_filler, max_filler, random.Random(f"{seed}-{label or task}"), min_depth,
                          max_depth, kwargs)


def tokenize(lm, doc) -> tuple[list[int], list[tuple[int, int]]]:
    """``(ids with BOS, [(first, end) token index of each answer])``: the whole text tokenised as
    in training; an answer's tokens are those overlapping its characters, found by binary search
    on the length of decoded prefixes (the tokenizers round-trip text exactly)."""
    body = list(lm.tokenizer.encode(doc.text))
    prefix = lm.encode("", bos=None)  # [BOS], or nothing
    head = len(prefix)
    decoded = {}

    def chars(i: int) -> int:  # characters covered by the first i tokens
        if i not in decoded:
            decoded[i] = len(lm.tokenizer.decode(body[:i]))
        return decoded[i]

    def first_token_reaching(c: int, strictly: bool) -> int:  # smallest i with chars(i) > c (or >= c)
        lo, hi = 0, len(body)
        while lo < hi:
            mid = (lo + hi) // 2
            if chars(mid) > c or (not strictly and chars(mid) >= c):
                hi = mid
            else:
                lo = mid + 1
        return lo

    spans = []
    for a, b in doc.answer_spans:
        s = first_token_reaching(a, strictly=True) - 1  # the token holding character a
        e = first_token_reaching(b, strictly=False)  # the first tokens covering everything up to b
        spans.append((head + s, head + e))
    return prefix + body, spans


@torch.no_grad()
def answer_token_hits(lm, ids: list[int], spans: list[tuple[int, int]]) -> list[list[bool]]:
    """Per answer, per token: predicted right (teacher-forced, one forward)."""
    x = torch.tensor([ids], dtype=torch.long, device=lm.device)
    pred = lm.logits(x)[0].argmax(-1)  # pred[t] is the prediction of token t + 1
    right = (pred[:-1] == x[0, 1:]).tolist()
    return [right[s - 1:e - 1] for s, e in spans]


def selecting_layers(model) -> list:
    """The model's NSA layers that select blocks (those with the selected branch)."""
    from nsa.layer import NSAAttention

    return [m for m in model.modules() if isinstance(m, NSAAttention) and "slc" in m.cfg.branches]


@contextmanager
def keep_selection(layers: list):
    """While open, each layer keeps its last forward's selected blocks (``last_selection``)."""
    for m in layers:
        m.keep_selection, m.last_selection, m.last_selection_inputs = True, None, None
    try:
        yield
    finally:
        for m in layers:
            m.keep_selection = False


def own_head_selection(layer) -> torch.Tensor | None:
    """The blocks each query head of ``layer`` would select from its own compressed probabilities
    alone, not summed over its KV group (NSA_SPEC.md, "GQA sharing"): ``[T, H, n]`` for the first
    row of the layer's last forward under :func:`keep_selection`, or None when it kept no inputs.
    Same top-n, forced blocks and tie rule as the model's selection (``nsa.select_blocks`` with each
    query head as a group of one)."""
    import nsa

    kept = getattr(layer, "last_selection_inputs", None)
    if kept is None:
        return None
    q, k_cmp = kept
    cfg = layer.cfg
    idx = nsa.select_blocks(q[:1], k_cmp[:1].repeat_interleave(q.shape[2] // k_cmp.shape[2], dim=2),
                            block_len=cfg.block_len, stride=cfg.stride, select_len=cfg.select_len,
                            num_select=cfg.num_select, num_init=cfg.num_init, num_local=cfg.num_local,
                            scale=layer.scale)
    return idx[0].cpu()


def selection_of_sources(layers: list, ids: list[int], spans: list[tuple[int, int]]) -> list[dict | None]:
    """After a forward of ``ids`` under :func:`keep_selection`: per answer token ``p``, whether each
    layer's block selection for the query at ``p - 1`` holds the token's source, the block of its
    latest occurrence before the answer (``None`` if it has none there). ``[{"forced": bool,
    "selected": [[bool per KV head] per layer]}]`` in answer-token order, with ``"head_selected":
    [[bool per query head] per layer]`` (:func:`own_head_selection`) when the layers kept their inputs."""
    sel = [m.last_selection[0].cpu() for m in layers]  # [T, Hkv, n] per layer
    own = [own_head_selection(m) for m in layers]  # [T, H, n] per layer, or None
    own = own if all(x is not None for x in own) else None
    cfg = layers[0].cfg
    ls = cfg.select_len
    out = []
    for s, e in spans:
        latest = {t: q for q, t in enumerate(ids[:s])}
        for p in range(s, e):
            q = latest.get(ids[p])
            if q is None:
                out.append(None)
                continue
            b, cur = q // ls, (p - 1) // ls
            entry = {"forced": b < cfg.num_init or b > cur - cfg.num_local,
                     "selected": [(L[p - 1] == b).any(-1).tolist() for L in sel]}
            if own is not None:
                entry["head_selected"] = [(L[p - 1] == b).any(-1).tolist() for L in own]
            out.append(entry)
    return out


def selection_summary(tokens: list[tuple[bool, dict | None]]) -> dict | None:
    """Of ``(right, selection_of_sources entry)`` per answer token: the share whose source block is
    forced (initial or local), and, over the others, the rate at which each (layer, KV head) selects
    it, for the tokens predicted right and wrong (a head whose rate splits them is where the
    look-up reads; a low rate there is the selection's cost); with ``head_selected`` entries, the
    same per query head for its own selection (``head_selected_when_right`` / ``_wrong``)."""
    have = [(r, x) for r, x in tokens if x is not None]
    if not have:
        return None
    free = [(r, x) for r, x in have if not x["forced"]]

    def rates(group, key="selected"):
        if not group:
            return None
        n_layers, n_heads = len(group[0][1][key]), len(group[0][1][key][0])
        return [[round(sum(x[key][i][h] for _, x in group) / len(group), 4) for h in range(n_heads)]
                for i in range(n_layers)]

    out = {"tokens": len(have), "source_forced": sum(x["forced"] for _, x in have) / len(have),
           "not_forced": len(free), "not_forced_right": sum(r for r, _ in free)}
    right, wrong = [g for g in free if g[0]], [g for g in free if not g[0]]
    for key in ("selected", "head_selected") if all("head_selected" in x for _, x in have) else ("selected",):
        out[f"{key}_when_right"], out[f"{key}_when_wrong"] = rates(right, key), rates(wrong, key)
    return out


def one_token_lookup(ids: list[int], spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Per answer: (tokens an ideal one-token look-up predicts right, tokens). Token ``p`` is predicted
    as the token after the latest ``q < p - 1`` with ``ids[q] == ids[p - 1]`` (wrong if none)."""
    last: dict[int, int] = {}  # token -> latest position seen so far, among positions < p - 1
    out, seen = [], 0
    for s, e in spans:
        right = 0
        for p in range(s, e):
            while seen < p - 1:
                last[ids[seen]] = seen
                seen += 1
            q = last.get(ids[p - 1])
            right += q is not None and ids[q + 1] == ids[p]
        out.append((right, e - s))
    return out


def _rates(scores: list[tuple[int, int]]) -> tuple[float, float]:
    """(share of answers with every token right, share of tokens right) of ``(right, tokens)`` pairs."""
    return (sum(ok == n for ok, n in scores) / max(1, len(scores)),
            sum(ok for ok, _ in scores) / max(1, sum(n for _, n in scores)))


def _summary(rows: list[dict]) -> dict:
    answers = [a for r in rows for a in r["answers"]]
    exact, token_acc = _rates(answers)
    lookup_exact, lookup_token_acc = _rates([a for r in rows for a in r["lookup"]])
    return {
        "documents": len(rows),
        "answers": len(answers),
        "exact": exact,
        "token_acc": token_acc,
        "doc_exact": sum(all(ok == n for ok, n in r["answers"]) for r in rows) / max(1, len(rows)),
        "lookup_exact": lookup_exact,
        "lookup_token_acc": lookup_token_acc,
    }


def run_retrieval(lm, cfg: Mapping, progress: bool = True) -> tuple[dict, list[dict]]:
    """Score every task of ``cfg["tasks"]``; returns (results per task, per-document records)."""
    from tqdm.auto import tqdm

    tasks = dict(cfg["tasks"])
    if not tasks:
        raise ValueError("retrieval.tasks is empty")
    n_buckets = int(cfg.get("num_buckets", 4))
    # NSA: also where each answer's source block was selected
    layers = selecting_layers(lm.model) if isinstance(getattr(lm, "model", None), torch.nn.Module) else []
    results, records = {}, []
    for task, tc in tasks.items():
        tc = dict(tc or {})
        unknown = sorted(set(tc) - set(TASK_KWARGS))
        if unknown:
            raise ValueError(f"retrieval.tasks.{task}: unknown keys {unknown}; allowed: {list(TASK_KWARGS)}")
        docs = documents(str(tc.get("task", task)), int(tc.get("num_documents", cfg.get("num_documents", 32))),
                         int(tc.get("min_filler_chars", 0)), int(tc.get("max_filler_chars", 1000)),
                         int(cfg.get("seed", 0)), tc.get("kwargs"), float(tc.get("min_depth", 0.0)),
                         float(tc.get("max_depth", 1.0)), label=task)
        rows, sources = [], []
        for doc in tqdm(docs, desc=f"retrieval/{task}", disable=not progress):
            ids, spans = tokenize(lm, doc)
            if len(ids) > lm.max_length:
                raise ValueError(f"a {task} document has {len(ids)} tokens, more than max_length {lm.max_length}: "
                                 f"lower retrieval.tasks.{task}.max_filler_chars")
            with keep_selection(layers):
                hits = answer_token_hits(lm, ids, spans)
            if layers:
                flat = [h for answer in hits for h in answer]
                sources += zip(flat, selection_of_sources(layers, ids, spans), strict=True)
            rows.append({"task": task, "tokens": len(ids), "depth": doc.depth,
                         "answers": [(sum(h), len(h)) for h in hits], "lookup": one_token_lookup(ids, spans)})
        res = _summary(rows)
        if layers:
            res["selection"] = selection_summary(sources)
        # by document length: in longer documents the source of the answer can be further back
        order = sorted(rows, key=lambda r: r["tokens"])
        res["by_length"] = []
        for i in range(n_buckets):
            part = order[len(order) * i // n_buckets: len(order) * (i + 1) // n_buckets]
            if part:
                res["by_length"].append({"min_tokens": part[0]["tokens"], "max_tokens": part[-1]["tokens"],
                                         **_summary(part)})
        results[task] = res
        records += [{**r, "answers": [list(a) for a in r["answers"]], "lookup": [list(a) for a in r["lookup"]]}
                    for r in rows]
    return results, records


def results_markdown(results: Mapping) -> str:
    rows = [[t, r["documents"], r["answers"], r["exact"], r["token_acc"], r["doc_exact"], r["lookup_exact"],
             r["lookup_token_acc"]] for t, r in results.items()]
    md = "# Retrieval on held-out synthetic documents\n\n"
    md += markdown_table(["task", "documents", "answers", "exact", "token acc", "doc exact",
                          "one-token look-up exact", "look-up token acc"], rows, 3)
    for t, r in results.items():
        md += f"\n\n## {t}: by document length\n\n"
        md += markdown_table(["tokens", "documents", "exact", "token acc"],
                             [[f"{b['min_tokens']}-{b['max_tokens']}", b["documents"], b["exact"], b["token_acc"]]
                              for b in r["by_length"]], 3)
        sel = r.get("selection")
        if sel and sel["not_forced"]:
            md += (f"\n\nNSA block selection: {sel['source_forced']:.0%} of answer tokens have their source in a "
                   f"forced block; of the other {sel['not_forced']} ({sel['not_forced_right']} right), the share "
                   "whose source block each layer selects, per KV head, when right / when wrong:\n\n")

            def fmt(rates, i):
                return " ".join(f"{x:.2f}" for x in rates[i]) if rates else "-"

            per_head = ("\n\nThe same per query head, for the blocks each head alone would select (its own "
                        "compressed probabilities, not summed over its KV group):\n\n")
            for intro, key in (("", "selected"), (per_head, "head_selected")):
                right, wrong = sel.get(f"{key}_when_right"), sel.get(f"{key}_when_wrong")
                if right or wrong:
                    md += intro + markdown_table(["layer", "right", "wrong"],
                                                 [[i, fmt(right, i), fmt(wrong, i)] for i in range(len(right or wrong))], 2)
    return md + "\n"
