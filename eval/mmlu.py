"""MMLU (Hendrycks et al., 2021): 57 subjects, k-shot from the dev split, letter log-likelihood.

Prompt (the standard one)::

    The following are multiple choice questions (with answers) about {subject}.\\n\\n
    {dev question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer: B\\n\\n   (k times)
    {test question}\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:

The prediction is the letter whose continuation " A" .. " D" has the highest
log-likelihood. When a prompt exceeds the model's length the shots are dropped
one at a time (as the original evaluation code does). Accuracy per subject, the
micro average over all questions, the macro average over subjects, and micro
averages per category (STEM, humanities, social sciences, other).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

LETTERS = ("A", "B", "C", "D")
_CATEGORY_SUBJECTS = {
    "STEM": "abstract_algebra astronomy college_biology college_chemistry college_computer_science "
            "college_mathematics college_physics computer_security conceptual_physics electrical_engineering "
            "elementary_mathematics high_school_biology high_school_chemistry high_school_computer_science "
            "high_school_mathematics high_school_physics high_school_statistics machine_learning",
    "humanities": "formal_logic high_school_european_history high_school_us_history high_school_world_history "
                  "international_law jurisprudence logical_fallacies moral_disputes moral_scenarios philosophy "
                  "prehistory professional_law world_religions",
    "social_sciences": "econometrics high_school_geography high_school_government_and_politics "
                       "high_school_macroeconomics high_school_microeconomics high_school_psychology "
                       "human_sexuality professional_psychology public_relations security_studies sociology "
                       "us_foreign_policy",
    "other": "anatomy business_ethics clinical_knowledge college_medicine global_facts human_aging management "
             "marketing medical_genetics miscellaneous nutrition professional_accounting professional_medicine "
             "virology",
}
SUBJECT_CATEGORY = {s: cat for cat, subs in _CATEGORY_SUBJECTS.items() for s in subs.split()}
REQUIRED_COLUMNS = ("question", "subject", "choices", "answer")


def answer_index(answer) -> int:
    """Gold answer as 0..3 from an int or a letter."""
    if isinstance(answer, str) and answer.strip().upper() in LETTERS:
        return LETTERS.index(answer.strip().upper())
    idx = int(answer)
    if not 0 <= idx < 4:
        raise ValueError(f"answer index {answer!r} is not in 0..3")
    return idx


def format_example(row: Mapping, include_answer: bool) -> str:
    if len(row["choices"]) != 4:
        raise ValueError(f"MMLU question needs 4 choices, got {len(row['choices'])}: {row['question'][:60]!r}")
    text = row["question"].strip() + "\n"
    text += "".join(f"{letter}. {choice}\n" for letter, choice in zip(LETTERS, row["choices"], strict=True))
    text += "Answer:"
    if include_answer:
        text += f" {LETTERS[answer_index(row['answer'])]}\n\n"
    return text


def build_prompt(subject: str, shots: Sequence[Mapping], row: Mapping) -> str:
    """The k-shot prompt for one test question (k = len(shots))."""
    header = f"The following are multiple choice questions (with answers) about {subject.replace('_', ' ')}.\n\n"
    return header + "".join(format_example(s, True) for s in shots) + format_example(row, False)


def load_split(source: str, data_dir: str | Path | None, split: str) -> list[dict]:
    """Rows of ``split`` ("dev" / "test") from a local dir (files named *{split}*.jsonl|json|parquet|csv) or the hub."""
    import datasets

    if data_dir is not None:
        files = sorted(p for p in Path(data_dir).rglob(f"*{split}*")
                       if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet", ".csv"))
        if not files:
            raise ValueError(f"no MMLU {split} files (*{split}*.jsonl|json|parquet|csv) under {str(data_dir)!r}")
        fmt = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}[files[0].suffix[1:]]
        ds = datasets.load_dataset(fmt, data_files=[str(f) for f in files], split="train")
    else:
        ds = datasets.load_dataset(source, "all", split=split)
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise ValueError(f"MMLU {split} data lacks columns {missing}; has {ds.column_names}")
    return [dict(r) for r in ds]


def run_mmlu(lm, cfg: Mapping, progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate; returns (results, per-question records)."""
    k = int(cfg.get("num_fewshot", 5))
    dev = load_split(cfg.get("source", "cais/mmlu"), cfg.get("data_dir"), cfg.get("dev_split", "dev"))
    test = load_split(cfg.get("source", "cais/mmlu"), cfg.get("data_dir"), cfg.get("test_split", "test"))
    wanted = cfg.get("subjects")
    by_subject: dict[str, list[dict]] = {}
    for r in test:
        if not wanted or r["subject"] in wanted:
            by_subject.setdefault(r["subject"], []).append(r)
    if not by_subject:
        raise ValueError(f"no MMLU test questions for subjects {wanted}")
    limit = cfg.get("limit")
    shots_of: dict[str, list[dict]] = {}
    for r in dev:
        shots_of.setdefault(r["subject"], []).append(r)
    pairs, meta = [], []
    for subject in sorted(by_subject):
        rows = by_subject[subject][:limit] if limit else by_subject[subject]
        for qi, row in enumerate(rows):
            shots = shots_of.get(subject, [])[:k]
            while True:
                prompt = build_prompt(subject, shots, row)
                ctx = lm.encode(prompt)
                if len(ctx) + 2 <= lm.max_length or not shots:
                    break
                shots = shots[:-1]
            for letter in LETTERS:
                whole = lm.encode(prompt + " " + letter)
                pairs.append((ctx, whole[len(ctx):] or whole[-1:]))
            meta.append((subject, qi, row, len(shots), len(ctx)))
    scores = lm.loglikelihood(pairs, batch_size=int(cfg.get("batch_size", 8)), progress=progress)
    records = []
    for n, (subject, qi, row, used, ntok) in enumerate(meta):
        lls = [scores[4 * n + j][0] for j in range(4)]
        pred = max(range(4), key=lambda j: lls[j])
        gold = answer_index(row["answer"])
        records.append({"subject": subject, "index": qi, "question": row["question"], "gold": LETTERS[gold],
                        "pred": LETTERS[pred], "correct": pred == gold, "loglikelihoods": lls,
                        "num_fewshot": used, "prompt_tokens": ntok})
    return summarize(records), records


def summarize(records: Sequence[Mapping]) -> dict:
    """Per-subject accuracy, micro (all questions) and macro (subject mean) averages, per-category micro."""
    per: dict[str, list[bool]] = {}
    for r in records:
        per.setdefault(r["subject"], []).append(bool(r["correct"]))
    subjects = {s: {"acc": sum(v) / len(v), "n": len(v), "category": SUBJECT_CATEGORY.get(s, "other")}
                for s, v in sorted(per.items())}
    cats: dict[str, list[bool]] = {}
    for s, v in per.items():
        cats.setdefault(SUBJECT_CATEGORY.get(s, "other"), []).extend(v)
    allv = [c for v in per.values() for c in v]
    return {
        "subjects": subjects,
        "categories": {c: {"acc": sum(v) / len(v), "n": len(v)} for c, v in sorted(cats.items())},
        "micro_avg": sum(allv) / len(allv),
        "macro_avg": sum(s["acc"] for s in subjects.values()) / len(subjects),
        "n": len(allv),
    }


def results_markdown(results: Mapping) -> str:
    from eval.io import markdown_table

    text = "# MMLU\n\n" + markdown_table(
        ["category", "n", "accuracy"], [[c, v["n"], 100 * v["acc"]] for c, v in results["categories"].items()])
    text += f"\nMicro average: {100 * results['micro_avg']:.2f}  Macro average: {100 * results['macro_avg']:.2f}  (n={results['n']})\n\n"
    text += "## Subjects\n\n" + markdown_table(
        ["subject", "category", "n", "accuracy"],
        [[s, v["category"], v["n"], 100 * v["acc"]] for s, v in results["subjects"].items()])
    return text
