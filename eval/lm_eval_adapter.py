"""lm-evaluation-harness adapter: our checkpoints as a registered ``TemplateLM`` ("nsa").

    import eval.lm_eval_adapter, lm_eval
    lm_eval.simple_evaluate(model="nsa", model_args="pretrained=outputs/runs/x", tasks=["hellaswag"])
    # or model=NSALM(lm=EvalLM(...)) with an already loaded model
    # lm-eval's MMLU on local cais/mmlu-format files, offline: local_mmlu_tasks(data_dir, task_dir)

Contexts get BOS first (as every training document does); ``prefix_token_id`` (the
context of an empty-context request) is BOS. Rolling log-likelihood uses lm-eval's
disjoint windows of ``max_length`` tokens. ``generate_until`` decodes greedily
through the KV-cached ``generate`` and cuts at the request's ``until`` strings.
Importing this module imports lm_eval (only the lm-eval code paths import it).
"""

from __future__ import annotations

from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model

from eval.lm import EvalLM, cut_at_stop


@register_model("nsa", "nsa-pretrain")
class NSALM(TemplateLM):
    """``pretrained``: an export dir or run dir; or pass a loaded ``lm`` (EvalLM)."""

    def __init__(self, pretrained: str | None = None, lm: EvalLM | None = None, device: str = "cpu",
                 dtype: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, add_bos: bool = True, **kwargs):
        super().__init__()
        if lm is None:
            if pretrained is None:
                raise ValueError("NSALM needs pretrained=<export or run dir> or lm=<EvalLM>")
            lm = EvalLM.from_checkpoint(pretrained, device=device, dtype=dtype, max_length=max_length,
                                        add_bos=add_bos)
        self.lm = lm
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8
        self.max_gen_toks = int(max_gen_toks)

    @property
    def eot_token_id(self) -> int:
        return self.lm.eos_id

    @property
    def prefix_token_id(self) -> int:
        bos = getattr(self.lm.tokenizer, "bos_id", None)
        return int(bos) if bos is not None and bos >= 0 else self.lm.eos_id

    @property
    def max_length(self) -> int:
        return self.lm.max_length

    @property
    def device(self):
        return self.lm.device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """Token ids; BOS first unless ``add_special_tokens`` is False."""
        return self.lm.encode(string, bos=self.lm.add_bos and add_special_tokens is not False)

    def tok_decode(self, tokens, **kwargs) -> str:
        return self.lm.decode(tokens)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out = self.lm.loglikelihood([(ctx, cont) for _, ctx, cont in requests], batch_size=self.batch_size,
                                    progress=not disable_tqdm)
        for (key, _, _), res in zip(requests, out, strict=True):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, res)
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        results = []
        for req in requests:
            (text,) = req.args
            ids = self.tok_encode(text, add_special_tokens=False)
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=ids, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)]
            scores = self.lm.loglikelihood(windows, batch_size=self.batch_size)
            total = sum(s for s, _ in scores)
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            results.append(total)
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        from tqdm.auto import tqdm

        results = []
        for req in tqdm(requests, disable=disable_tqdm, desc="generate_until"):
            context, gen_kwargs = req.args
            kw = dict(gen_kwargs or {})
            until = kw.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kw.get("max_gen_toks", self.max_gen_toks))
            ids = self.tok_encode(context)
            ids = ids[-max(1, self.max_length - max_new):]
            text = self.lm.generate([ids], max_new)[0]
            text = cut_at_stop(text, until)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            results.append(text)
        return results


def run_suite(lm: EvalLM, suite: list, *, limit=None, batch_size: int = 8, include_path: str | None = None,
              confirm_run_unsafe_code: bool = False, log_samples: bool = False) -> dict:
    """Run each ``{name, num_fewshot}`` of a suite through ``lm_eval.simple_evaluate``.

    One call per task so that every task gets its own shot count (the paper's).
    Returns ``{name: lm-eval results dict of that task (and its subtasks)}``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    model = NSALM(lm=lm, batch_size=batch_size)
    tm = TaskManager(include_path=include_path) if include_path else TaskManager()
    out = {}
    for item in suite:
        name, shots = item["name"], item.get("num_fewshot")
        res = lm_eval.simple_evaluate(model=model, tasks=[name], num_fewshot=shots, limit=limit, task_manager=tm,
                                      log_samples=log_samples, confirm_run_unsafe_code=confirm_run_unsafe_code,
                                      bootstrap_iters=0)
        out[name] = {"num_fewshot": shots, "results": res["results"],
                     "samples": res.get("samples") if log_samples else None}
    return out


def local_mmlu_tasks(data_dir: str | Path, out_dir: str | Path, subjects: list[str] | None = None,
                     dev_split: str = "dev", test_split: str = "test", group: str = "mmlu_local") -> list[str]:
    """lm-eval's own ``mmlu_<subject>`` tasks on local files in the cais/mmlu columns, offline.

    Reads ``data_dir`` as ``eval.mmlu`` does (files named *dev* / *test*, columns question,
    subject, choices, answer), writes one dev and one test jsonl per subject and, per subject, a
    task yaml that ``include``s lm-eval's installed ``mmlu/default/mmlu_<subject>.yaml`` (its
    prompt, description, first-n few-shot sampler from dev and ``acc`` metric) and replaces only
    the data source; plus a group ``group`` aggregating ``acc`` weighted by size (lm-eval's mmlu
    aggregation, the micro average). Returns ``[group, task, ...]``; use
    ``TaskManager(include_path=out_dir)``.
    """
    import json

    import lm_eval.tasks
    import yaml

    from eval.mmlu import answer_index, load_split

    template_dir = Path(lm_eval.tasks.__file__).parent / "mmlu" / "default"
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split in (dev_split, test_split):
        splits[split] = {}
        for row in load_split("cais/mmlu", data_dir, split):
            if not subjects or row["subject"] in subjects:
                splits[split].setdefault(row["subject"], []).append(
                    {"question": row["question"], "subject": row["subject"], "choices": list(row["choices"]),
                     "answer": answer_index(row["answer"])})
    names = sorted(splits[test_split])
    if not names:
        raise ValueError(f"no MMLU {test_split} questions under {str(data_dir)!r} for subjects {subjects}")
    tasks = []
    for subject in names:
        template = template_dir / f"mmlu_{subject}.yaml"
        if not template.is_file():
            raise ValueError(f"{subject!r} is not an MMLU subject of lm-eval ({template} not found)")
        if subject not in splits[dev_split]:
            raise ValueError(f"MMLU subject {subject!r} has no {dev_split} rows (the few-shot examples)")
        files = {}
        for split, key in ((dev_split, "dev"), (test_split, "test")):
            files[key] = out_dir / f"{subject}_{key}.jsonl"
            files[key].write_text("".join(json.dumps(r) + "\n" for r in splits[split][subject]), encoding="utf-8")
        task = f"{group}_{subject}"
        config = {"include": str(template), "task": task, "tag": f"{group}_tasks", "dataset_path": "json",
                  "dataset_name": None, "dataset_kwargs": {"data_files": {k: str(v) for k, v in files.items()}},
                  "test_split": "test", "fewshot_split": "dev"}
        (out_dir / f"{task}.yaml").write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
        tasks.append(task)
    group_config = {"group": group, "task": tasks,
                    "aggregate_metric_list": [{"metric": "acc", "weight_by_size": True}], "metadata": {"version": 2}}
    (out_dir / f"_{group}.yaml").write_text(yaml.safe_dump(group_config, sort_keys=False), encoding="utf-8")
    return [group] + tasks


def suite_rows(out: dict) -> list[list]:
    """(suite task, lm-eval task, metric, value) rows for a table; stderr entries skipped."""
    rows = []
    for name, entry in out.items():
        for task, metrics in entry["results"].items():
            for key, value in metrics.items():
                if isinstance(value, (int, float)) and "stderr" not in key and key != "alias":
                    rows.append([name, task, key, float(value)])
    return rows
