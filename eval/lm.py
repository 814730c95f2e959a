"""EvalLM: one checkpoint + tokenizer behind the three calls every harness needs.

* ``loglikelihood(pairs)``: sum log p(continuation | context) and whether the
  continuation is the greedy one (MMLU, lm-eval multiple choice).
* ``token_nll(ids)``: per-token negative log-likelihood ``[B, T-1]`` (perplexity).
* ``generate(prompts)``: greedy, KV-cached, batched decoding through
  ``train.model.generate.generate`` (NIAH, LongBench, lm-eval generate_until).

Batches are right-padded: with a causal model the pad tokens after a sequence
cannot change any logit inside it, so no attention mask is needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from eval.checkpoint import CheckpointInfo, resolve_checkpoint
from train.model.config import SPARSITY_KEYS


def _dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    if name is None or isinstance(name, torch.dtype):
        return name
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(table)}")
    return table[name]


# NSA settings that hold no weights, so a trained model runs with other values (e.g. reading more
# selected blocks than in training, to see whether block selection limits a result)
INFERENCE_ATTENTION_KEYS = (*SPARSITY_KEYS, "backend")


def override_attention(model, overrides: Mapping) -> None:
    """Change weight-free NSA settings of every attention layer of ``model`` in place (validated)."""
    import dataclasses

    from nsa.layer import NSAAttention

    unknown = sorted(set(overrides) - set(INFERENCE_ATTENTION_KEYS))
    if unknown:
        raise ValueError(f"attention overrides at evaluation: {unknown} not allowed (they change weights or "
                         f"shapes); allowed: {list(INFERENCE_ATTENTION_KEYS)}")
    if getattr(model.attn_cfg, "kind", None) != "nsa":
        raise ValueError("attention overrides at evaluation need an NSA model")
    cfg = dataclasses.replace(model.attn_cfg, **dict(overrides))
    cfg.validate()
    layer_cfg = cfg.nsa_config(model.cfg)
    for module in model.modules():
        if isinstance(module, NSAAttention):
            module.cfg = layer_cfg
    model.attn_cfg = cfg


class EvalLM:
    """Wraps ``(model, tokenizer)``; ``max_length`` caps any sequence fed to the model."""

    def __init__(self, model, tokenizer, *, max_length: int | None = None, add_bos: bool = True,
                 info: CheckpointInfo | None = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.add_bos = add_bos
        cfg_len = getattr(getattr(model, "cfg", None), "max_seq_len", None)
        self.max_length = int(max_length or cfg_len or 4096)
        self.info = info
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @classmethod
    def from_checkpoint(cls, path: str | Path, device: str = "cpu", dtype: str | None = None,
                        max_length: int | None = None, add_bos: bool = True,
                        attention: Mapping | None = None) -> EvalLM:
        """Load an export dir or a run dir through ``train.model.load_pretrained``; ``attention``:
        NSA settings changed for this evaluation (:func:`override_attention`)."""
        from train.model import load_pretrained

        info = resolve_checkpoint(path)
        model, tokenizer = load_pretrained(str(info.export_dir), device=device, dtype=_dtype(dtype))
        if attention:
            override_attention(model, attention)
        return cls(model, tokenizer, max_length=max_length, add_bos=add_bos, info=info)

    # ---- tokens -------------------------------------------------------------------------------
    @property
    def eos_id(self) -> int:
        return int(self.tokenizer.eos_id)

    @property
    def pad_id(self) -> int:
        pad = getattr(self.tokenizer, "pad_id", None)
        return int(pad) if pad is not None and pad >= 0 else self.eos_id

    def encode(self, text: str, bos: bool | None = None) -> list[int]:
        """Token ids of ``text``, with BOS first when ``bos`` (default: ``add_bos``)."""
        ids = list(self.tokenizer.encode(text))
        use_bos = self.add_bos if bos is None else bos
        bos_id = getattr(self.tokenizer, "bos_id", None)
        if use_bos and bos_id is not None and bos_id >= 0:
            ids = [int(bos_id)] + ids
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode([int(i) for i in ids])

    # ---- scoring ------------------------------------------------------------------------------
    def _pad(self, seqs: Sequence[Sequence[int]]) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        out = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        for i, s in enumerate(seqs):
            out[i, : len(s)] = torch.as_tensor(list(s), dtype=torch.long)
        return out.to(self.device)

    @torch.no_grad()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Float32 logits ``[B, T, V]`` of a right-padded batch ``[B, T]``."""
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        out = self.model(input_ids, position_ids=pos)
        logits = out.logits if hasattr(out, "logits") else out
        return logits.float()

    @torch.no_grad()
    def token_nll(self, input_ids: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
        """NLL of each next token: ``[B, T-1]`` float32, entry t scores token t+1 given tokens <= t.

        The float32 log-softmax is taken ``chunk`` positions at a time, so a 64k-token
        row never materialises a second full-vocabulary float32 copy of the logits.
        """
        b, t = input_ids.shape
        pos = torch.arange(t, device=input_ids.device).unsqueeze(0).expand(b, t)
        out = self.model(input_ids, position_ids=pos)
        logits = out.logits if hasattr(out, "logits") else out
        nll = torch.empty(b, t - 1, dtype=torch.float32, device=logits.device)
        for s in range(0, t - 1, chunk):
            e = min(s + chunk, t - 1)
            logp = torch.log_softmax(logits[:, s:e].float(), dim=-1)
            nll[:, s:e] = -logp.gather(-1, input_ids[:, s + 1: e + 1].unsqueeze(-1)).squeeze(-1)
        return nll

    @torch.no_grad()
    def loglikelihood(self, pairs: Sequence[tuple[Sequence[int], Sequence[int]]], batch_size: int = 8,
                      progress: bool = False) -> list[tuple[float, bool]]:
        """``(sum log p(cont | ctx), cont is greedy)`` per pair; contexts are left-cut to max_length."""
        from tqdm.auto import tqdm

        for ctx, cont in pairs:
            if not cont:
                raise ValueError("loglikelihood needs a non-empty continuation")
            if not ctx:
                raise ValueError("loglikelihood needs a non-empty context (put BOS in it)")
        order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc="loglikelihood"):
            idx = order[start: start + batch_size]
            seqs, conts = [], []
            for i in idx:
                ctx, cont = pairs[i]
                full = (list(ctx) + list(cont))[-(self.max_length + 1):]
                seqs.append(full[:-1])
                conts.append(list(cont)[-len(full) + 1:] if len(cont) >= len(full) else list(cont))
            logp = torch.log_softmax(self.logits(self._pad(seqs)), dim=-1)
            for row, (i, seq, cont) in enumerate(zip(idx, seqs, conts, strict=True)):
                n = len(cont)
                lp = logp[row, len(seq) - n: len(seq)]
                target = torch.as_tensor(cont, device=lp.device)
                total = lp.gather(-1, target.unsqueeze(-1)).sum().item()
                greedy = bool((lp.argmax(-1) == target).all().item())
                results[i] = (float(total), greedy)
        return results  # type: ignore[return-value]

    # ---- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def generate_ids(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                     stop_ids: Sequence[int] | None = None) -> list[list[int]]:
        """Greedy continuation ids of each prompt (the stop token that ended a row is excluded)."""
        from train.model.generate import generate

        stops = list(stop_ids) if stop_ids is not None else [self.eos_id]
        out = generate(self.model, [list(p) for p in prompts], max_new_tokens=max_new_tokens,
                       temperature=0.0, top_k=None, top_p=None, stop_ids=stops)
        return [list(seq) for seq in out]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, batch_size: int = 1,
                 stop_strings: Sequence[str] = (), progress: bool = False, desc: str = "generate") -> list[str]:
        """Greedy text continuations, batched by similar prompt length, cut at the first stop string."""
        from tqdm.auto import tqdm

        order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
        texts: list[str] = [""] * len(prompts)
        for start in tqdm(range(0, len(order), batch_size), disable=not progress, desc=desc):
            idx = order[start: start + batch_size]
            outs = self.generate_ids([prompts[i] for i in idx], max_new_tokens)
            for i, ids in zip(idx, outs, strict=True):
                texts[i] = cut_at_stop(self.decode(ids), stop_strings)
        return texts


def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest occurrence of any stop string."""
    cut = len(text)
    for s in stop_strings:
        if s:
            k = text.find(s)
            if k != -1:
                cut = min(cut, k)
    return text[:cut]
