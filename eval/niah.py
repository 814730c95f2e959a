"""Needle in a haystack: retrieval accuracy on a (context length x needle depth) grid.

A needle (a fact sentence, a passkey number, RULER-style multi-key / multi-value
"special magic number" lines, or a list of words to copy back) is inserted at a line boundary at relative depth
``d`` (0 = start, 1 = end) of a haystack cut at line boundaries from a corpus (by
default the Python standard library, the training corpus of the pystdlib data
source). The prompt ``prefix + haystack-with-needle + question`` is built as text and
encoded at once (``[BOS]`` first), as the training documents are, so the tokens at line
and needle boundaries are the ones a model saw in training; its length is within about one
corpus line of the target length and never above it. The
model decodes greedily; a sample scores the fraction of expected answers found in
the prediction (case-insensitive substring, RULER's ``string_match_all``), and
``exact`` is 1 when the first line of the prediction is exactly the answer.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

NEEDLE_KINDS = ("fact", "passkey", "multikey", "multivalue", "copy")
KEY_WORDS = ("amber", "basalt", "cobalt", "dune", "ember", "fjord", "garnet", "harbor", "indigo", "jasper",
             "kelp", "lagoon", "meadow", "nickel", "onyx", "pebble", "quartz", "raven", "saffron", "tundra")


@dataclass
class Needle:
    """What to insert and ask: ``lines`` (first one goes at the depth), ``question``, ``answers``."""

    lines: list[str]
    question: str
    answers: list[str]
    answer_prefix: str = ""
    meta: dict = field(default_factory=dict)


def resolve_needle(cfg: Mapping) -> tuple[str, Mapping]:
    """``(kind, cfg)`` for the configured ``needle``: a kind name (``fact`` uses ``cfg["fact"]``), or the
    user's own fact as a mapping ``{needle, question, answer[, answer_prefix]}`` (kind ``fact``)."""
    spec = cfg["needle"]
    if isinstance(spec, Mapping):
        return "fact", dict(cfg, fact=dict(spec))
    if spec not in NEEDLE_KINDS:
        raise ValueError(f"unknown needle kind {spec!r}; known: {NEEDLE_KINDS}, or your own fact: "
                         "niah.needle='{needle: ..., question: ..., answer: ...}' (or niah.needle=fact niah.fact.needle=...)")
    return spec, cfg


def fact_needle(fact: Mapping) -> Needle:
    """A user-written fact: its sentence, the question and the answer (which the sentence must contain)."""
    fact = dict(fact or {})
    missing = [k for k in ("needle", "question", "answer") if not str(fact.get(k) or "").strip()]
    if missing:
        raise ValueError(f"a fact needle needs a non-empty {', '.join(missing)} (niah.fact.* or "
                         "niah.needle='{needle: ..., question: ..., answer: ...}')")
    text, answer = str(fact["needle"]).strip(), str(fact["answer"]).strip()
    if answer.lower() not in text.lower():
        raise ValueError(f"the needle's answer {answer!r} does not occur in the needle {text!r}: "
                         "nothing could be retrieved")
    return Needle([text + "\n"], str(fact["question"]).strip(), [answer], str(fact.get("answer_prefix") or "").strip())


def make_needle(kind: str, rng: random.Random, cfg: Mapping) -> Needle:
    """Draw one needle of ``kind`` (settings in ``cfg``: fact, passkey_digits, num_keys, num_values,
    copy_words)."""
    if kind == "fact":
        return fact_needle(cfg.get("fact"))
    if kind == "copy":
        # data.synthetic's copy documents with the haystack between the list and its copy: "Copy this
        # text exactly: <words>" at the depth, "Copy:" as the question, the whole list as the answer
        from data.synthetic import COPY_INSTRUCTION, COPY_QUESTION, WORDS

        n = int(cfg.get("copy_words", 8))
        if not 1 <= n <= len(WORDS):
            raise ValueError(f"copy_words must be in [1, {len(WORDS)}], got {n}")
        words = " ".join(rng.sample(WORDS, n))
        return Needle([f"{COPY_INSTRUCTION}{words}\n"], COPY_QUESTION, [words], "", {"words": n})
    if kind == "passkey":
        digits = int(cfg.get("passkey_digits", 5))
        key = str(rng.randrange(10 ** (digits - 1), 10 ** digits))
        # in the classic filler the needle is one more sentence of the running text, as in training
        end = " " if cfg.get("corpus") == "passkey_filler" else "\n"
        return Needle([f"The pass key is {key}. Remember it. {key} is the pass key.{end}"],
                      "What is the pass key?", [key], "The pass key is")
    digits = int(cfg.get("value_digits", 7))
    draw = lambda: str(rng.randrange(10 ** (digits - 1), 10 ** digits))
    line = "One of the special magic numbers for {k} is: {v}.\n"
    if kind == "multikey":
        n = int(cfg.get("num_keys", 4))
        if not 1 <= n <= len(KEY_WORDS):
            raise ValueError(f"num_keys must be in [1, {len(KEY_WORDS)}], got {n}")
        keys = rng.sample(KEY_WORDS, n)
        values = [draw() for _ in keys]
        return Needle([line.format(k=k, v=v) for k, v in zip(keys, values, strict=True)],
                      f"What is the special magic number for {keys[0]} mentioned in the provided text?",
                      [values[0]], f"The special magic number for {keys[0]} mentioned in the provided text is",
                      {"key": keys[0], "distractor_keys": keys[1:]})
    if kind == "multivalue":
        n = int(cfg.get("num_values", 4))
        if n < 1:
            raise ValueError(f"num_values must be >= 1, got {n}")
        key = rng.choice(KEY_WORDS)
        values = [draw() for _ in range(n)]
        return Needle([line.format(k=key, v=v) for v in values],
                      f"What are all the special magic numbers for {key} mentioned in the provided text?",
                      values, f"The special magic numbers for {key} mentioned in the provided text are",
                      {"key": key})
    raise ValueError(f"unknown needle kind {kind!r}; known: {NEEDLE_KINDS}")


def score_prediction(prediction: str, answers: Sequence[str]) -> tuple[float, float]:
    """(fraction of answers contained in the prediction, exact first-line match) in [0, 1]."""
    if not answers:
        raise ValueError("a needle needs at least one answer")
    low = prediction.lower()
    found = sum(a.lower() in low for a in answers) / len(answers)
    first = prediction.strip().split("\n")[0].strip().rstrip(".").strip()
    if len(answers) == 1:
        exact = float(first == answers[0])
    else:
        exact = float(sorted(re.findall(r"\d+", first)) == sorted(answers))
    return found, exact


# ---------------------------------------------------------------- haystack


def read_text_file(path: str | Path) -> str:
    """A plain-text file's text: UTF-8 (a BOM dropped), UTF-16 with a BOM, else Latin-1; line ends
    made ``\\n``."""
    data = Path(path).read_bytes()
    if data[:2] in (b"\xff\xfe", b"\xfe\xff"):
        data = data.decode("utf-16").encode("utf-8")
    if b"\x00" in data[:65536]:
        raise ValueError(f"haystack corpus file {str(path)!r} is not plain text (it has NUL bytes)")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        text = data.decode("latin-1")
    return text.replace("\r\n", "\n").replace("\r", "\n")


def text_lines(text: str, max_line_chars: int = 200) -> list[str]:
    """The non-blank lines of ``text``, each ending in a newline; a line longer than ``max_line_chars``
    is cut into pieces after a space (or at ``max_line_chars`` in a run without one), so that
    prose written one paragraph per line still gives fine-grained haystack (and needle) boundaries.
    The pieces of a line join back to it."""
    if max_line_chars < 1:
        raise ValueError(f"max_line_chars must be >= 1, got {max_line_chars}")
    out = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        line += "\n"
        while len(line) > max_line_chars:
            lead = len(line) - len(line.lstrip(" \t"))  # not inside the indentation
            cut = max(line.rfind(" ", lead, max_line_chars), line.rfind("\t", lead, max_line_chars)) + 1
            cut = cut if cut > lead else max_line_chars
            out.append(line[:cut])
            line = line[cut:]
        if line.strip():
            out.append(line)
        elif out:
            out[-1] += line  # only spaces left: they stay on the last piece
    return out


def corpus_lines(corpus: str | Sequence[str] | None, max_chars: int, max_line_chars: int = 200) -> list[str]:
    """Lines (with their newlines) of the corpus, at most about ``max_chars`` characters.

    ``corpus``: "pystdlib" / None (the standard library's .py files, sorted), "passkey_filler"
    (the classic passkey test's repeated "The grass is green..." sentences, as in
    :mod:`data.synthetic`'s passkey documents), or your own text: a plain-text file of any name,
    a directory (its *.txt, *.md, *.py files, sorted), or a list of such paths. Your files are read
    as UTF-8 (UTF-16 with a BOM, else Latin-1) with any line ends, blank lines dropped and long lines cut
    (:func:`text_lines`); the text is used once, never repeated (see :func:`run_niah`).
    """
    if corpus == "passkey_filler":
        from data.synthetic import PASSKEY_FILLER

        return list(PASSKEY_FILLER) * max(1, -(-max_chars // sum(map(len, PASSKEY_FILLER))))
    lines, total = [], 0
    if corpus in (None, "pystdlib"):
        from data.sources import PyStdlibSource, stdlib_files

        for f in stdlib_files(PyStdlibSource()):
            try:
                text = f.read_text(encoding="utf-8")
            except UnicodeDecodeError:
                continue
            for line in text.splitlines(keepends=True):
                if line.strip():
                    lines.append(line if line.endswith("\n") else line + "\n")
                    total += len(line)
            if total >= max_chars:
                break
        return lines
    files = []
    for item in [corpus] if isinstance(corpus, (str, Path)) else list(corpus):
        p = Path(item).expanduser()
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.suffix in (".txt", ".md", ".py") and f.is_file())
        elif p.is_file():
            files.append(p)
        else:
            raise ValueError(f"haystack corpus path {str(p)!r} does not exist")
    for f in files:
        for line in text_lines(read_text_file(f), max_line_chars):
            lines.append(line)
            total += len(line)
            if total >= max_chars:
                return lines
    if not lines:
        raise ValueError(f"haystack corpus {corpus!r} has no text")
    return lines


class Haystack:
    """Corpus lines with their token counts (each line encoded on its own), to budget haystacks."""

    def __init__(self, lines: Sequence[str], encode, name: str = "corpus"):
        self.lines = list(lines)
        self.lengths = [len(encode(line)) for line in self.lines]
        self.total_tokens = sum(self.lengths)
        self.name = name

    def take_indices(self, start: int, budget: int) -> list[int]:
        """Indices of consecutive lines from ``start`` (wrapping around past the end to the first
        line, each line at most once) while their token counts fit in ``budget``."""
        out, used, i = [], 0, start % len(self.lines)
        for _ in range(len(self.lines)):
            if used + self.lengths[i] > budget:
                break
            out.append(i)
            used += self.lengths[i]
            i = (i + 1) % len(self.lines)
        return out


def insert_at_depth(chunks: Sequence, needles: Sequence, depth: float, rng: random.Random) -> list:
    """``chunks`` (haystack lines) in order with the first needle at line boundary
    ``round(depth * len(chunks))`` and the others at random boundaries."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    slots: dict[int, list] = {}
    slots.setdefault(round(depth * len(chunks)), []).append(needles[0])
    for extra in needles[1:]:
        slots.setdefault(rng.randint(0, len(chunks)), []).append(extra)
    out: list = []
    for k in range(len(chunks) + 1):
        out += slots.get(k, [])
        if k < len(chunks):
            out.append(chunks[k])
    return out


def build_sample(lm, haystack: Haystack, needle: Needle, length: int, depth: float, rng: random.Random,
                 cfg: Mapping) -> list[int]:
    """Token ids of one prompt of at most ``length`` tokens: the text ``prefix + haystack lines with
    the needle at depth + question``, encoded at once. The lines are first budgeted by their own
    token counts; since the joined text encodes a little differently (tokens merge across line
    ends), lines are then added or dropped at the end until the prompt is as long as fits."""
    suffix = cfg["suffix"].format(question=needle.question, answer_prefix=needle.answer_prefix).rstrip(" ")
    budget = length - len(lm.encode(cfg["prefix"] + "".join(needle.lines) + suffix))
    if budget < 1:
        raise ValueError(f"context length {length} is too short for the prompt and needle "
                         f"({length - budget} tokens without haystack)")
    if budget > haystack.total_tokens:
        raise ValueError(
            f"haystack corpus {haystack.name} is too short for context length {length}: it has "
            f"{haystack.total_tokens} tokens ({len(haystack.lines)} lines), a {length}-token prompt needs "
            f"{budget} besides the instructions and needle, and the text is not repeated. Use a longer text "
            "(a bigger file, a directory or a list of files: niah.corpus=...) or shorter niah.context_lengths"
            " (if the corpus is larger than that, raise niah.chars_per_token: it caps how much is read)")
    start = rng.randrange(len(haystack.lines))
    state = rng.getstate()

    def encode(n):  # the prompt with the first n haystack lines from start (wrapping around)
        rng.setstate(state)  # the same needle slots on every try
        lines = [haystack.lines[(start + j) % len(haystack.lines)] for j in range(n)]
        body = "".join(insert_at_depth(lines, needle.lines, depth, rng))
        if suffix.startswith("\n"):  # as data.synthetic's passkey documents: no space before the question
            body = body.rstrip(" ")
        return lm.encode(cfg["prefix"] + body + suffix)

    n = len(haystack.take_indices(start, budget))
    ids = encode(n)
    while len(ids) > length and n > 0:
        n -= 1
        ids = encode(n)
    while n < len(haystack.lines) and len(more := encode(n + 1)) <= length:  # each line at most once
        n, ids = n + 1, more
    return ids


def run_niah(lm, cfg: Mapping, progress: bool = True) -> tuple[dict, list[dict]]:
    """Evaluate the grid; returns (results with grids and means, per-sample records)."""
    kind, cfg = resolve_needle(cfg)
    lengths = [int(x) for x in cfg["context_lengths"]]
    depths = [float(x) for x in cfg["depths"]]
    if any(not 0 <= d <= 1 for d in depths):
        raise ValueError(f"depths must be fractions in [0, 1], got {depths}")
    n = int(cfg.get("samples_per_cell", 1))
    corpus = cfg.get("corpus")
    lines = corpus_lines(corpus, max_chars=int(max(lengths) * float(cfg.get("chars_per_token", 8))),
                         max_line_chars=int(cfg.get("max_line_chars", 200)))
    haystack = Haystack(lines, lm.tokenizer.encode, name=repr(corpus if corpus is not None else "pystdlib"))
    jobs = []
    for li, length in enumerate(lengths):
        for di, depth in enumerate(depths):
            for s in range(n):
                rng = random.Random(f"{cfg.get('seed', 0)}-{kind}-{length}-{depth}-{s}")
                needle = make_needle(kind, rng, cfg)
                jobs.append((li, di, s, needle, build_sample(lm, haystack, needle, length, depth, rng, cfg)))
    preds = lm.generate([j[4] for j in jobs], int(cfg["max_new_tokens"]), batch_size=int(cfg.get("batch_size", 1)),
                        progress=progress, desc=f"niah/{kind}")
    records = []
    score = [[0.0] * len(depths) for _ in lengths]
    exact = [[0.0] * len(depths) for _ in lengths]
    for (li, di, s, needle, ids), pred in zip(jobs, preds, strict=True):
        found, ex = score_prediction(pred, needle.answers)
        score[li][di] += found / n
        exact[li][di] += ex / n
        records.append({"kind": kind, "context_length": lengths[li], "depth": depths[di], "sample": s,
                        "prompt_tokens": len(ids), "question": needle.question, "answers": needle.answers,
                        "pred": pred, "score": found, "exact": ex, **needle.meta})
    mean = lambda xs: sum(xs) / len(xs)
    results = {
        "needle": kind, "context_lengths": lengths, "depths": depths, "samples_per_cell": n,
        "score": score, "exact": exact,
        "per_length": {str(L): mean(score[i]) for i, L in enumerate(lengths)},
        "per_depth": {str(d): mean([row[j] for row in score]) for j, d in enumerate(depths)},
        "overall": mean([x for row in score for x in row]),
        "overall_exact": mean([x for row in exact for x in row]),
    }
    return results, records


def results_markdown(results: Mapping) -> str:
    """results.md: the score grid (rows: depth, columns: context length) and the means."""
    from eval.io import markdown_table

    lengths, depths = results["context_lengths"], results["depths"]
    headers = ["depth \\ length"] + [str(L) for L in lengths] + ["mean"]
    rows = [[f"{d:.0%}"] + [results["score"][i][j] for i in range(len(lengths))] + [results["per_depth"][str(d)]]
            for j, d in enumerate(depths)]
    rows.append(["mean"] + [results["per_length"][str(L)] for L in lengths] + [results["overall"]])
    return (f"# Needle in a haystack ({results['needle']})\n\nSubstring score (fraction of answers retrieved):\n\n"
            + markdown_table(headers, rows, digits=2)
            + f"\nOverall: {results['overall']:.3f}, exact first-line match: {results['overall_exact']:.3f}\n")
