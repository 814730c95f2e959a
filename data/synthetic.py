"""Synthetic long-context documents: passkey retrieval, needle retrieval, MQAR, verbatim copy.

Each generator returns a :class:`SyntheticDocument` whose ``text`` is the full training
document (prompt followed by the answer) and whose ``answer_spans`` locate every answer
in ``text``, so the same document serves as a mixture source for training and, cut at
``prompt``, as an evaluation item. Lengths are set by ``n_filler``: characters, or tokens
when a tokenizer is given (counted per filler sentence, so a document may overshoot by
less than one sentence). Everything is a pure function of ``rng``.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass, field

PASSKEY_FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ",)
HAYSTACK_SENTENCES = (
    "The river bends twice before it reaches the old mill. ",
    "Most of the village gathers in the square on market days. ",
    "A careful reader notices small changes in the weather. ",
    "The library keeps its oldest maps in a cool, dry room. ",
    "Trains leave the northern station every half hour. ",
    "Bakers start work long before the streets are awake. ",
    "The committee postponed its decision until the spring. ",
    "Gardeners prefer to water the beds in the early evening. ",
    "An engineer checked every bolt on the bridge last week. ",
    "Children fly kites on the hill when the wind is steady. ",
    "The museum added a hall for instruments from the coast. ",
    "Fishermen mend their nets while they wait for the tide. ",
)


@dataclass
class SyntheticDocument:
    """text = prompt + answers; answer_spans are (start, end) char offsets of each answer in text."""

    text: str
    answers: list[str]
    answer_spans: list[tuple[int, int]]
    depth: float = 0.0  # relative position of the (first) needle inside the filler, in [0, 1]
    meta: dict = field(default_factory=dict)

    @property
    def answer(self) -> str:
        return self.answers[0]

    @property
    def prompt(self) -> str:
        """Everything before the first answer: what an evaluation feeds the model."""
        return self.text[: self.answer_spans[0][0]]


def _as_random(rng) -> random.Random:
    if isinstance(rng, random.Random):
        return rng
    if hasattr(rng, "integers"):  # numpy Generator
        return random.Random(int(rng.integers(0, 2**62)))
    raise ValueError(f"rng must be random.Random or numpy.random.Generator, got {type(rng).__name__}")


def _filler(rng: random.Random, sentences, n: int, tokenizer=None, cycle: bool = False) -> list[str]:
    """Sentences whose total length reaches ``n`` chars (or tokens with a tokenizer)."""
    if n < 0:
        raise ValueError(f"n_filler must be >= 0, got {n}")
    cost = (lambda s: len(tokenizer.encode(s))) if tokenizer is not None else len
    costs: dict[str, int] = {}
    out, total, i = [], 0, 0
    while total < n:
        s = sentences[i % len(sentences)] if cycle else rng.choice(sentences)
        i += 1
        if s not in costs:
            costs[s] = max(1, cost(s))
        out.append(s)
        total += costs[s]
    return out


def _insert(parts: list[str], depth: float) -> tuple[str, str]:
    """Split filler sentences at ``depth`` in [0, 1] into the text (before, after) a needle."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    k = round(depth * len(parts))
    return "".join(parts[:k]), "".join(parts[k:])


def _doc(pieces: list[tuple[str, bool]], depth: float, meta: dict) -> SyntheticDocument:
    """Join (text, is_answer) pieces, recording answer spans."""
    text, answers, spans = "", [], []
    for s, is_answer in pieces:
        if is_answer:
            answers.append(s)
            spans.append((len(text), len(text) + len(s)))
        text += s
    return SyntheticDocument(text=text, answers=answers, answer_spans=spans, depth=depth, meta=meta)


def make_passkey_document(rng, n_filler: int, depth: float, *, digits: int = 5,
                          tokenizer=None) -> SyntheticDocument:
    """Passkey retrieval: a random ``digits``-digit key hidden at ``depth`` in repeated filler."""
    r = _as_random(rng)
    if digits < 1:
        raise ValueError(f"digits must be >= 1, got {digits}")
    key = str(r.randint(10 ** (digits - 1), 10**digits - 1))
    head = ("There is an important info hidden inside a lot of irrelevant text. "
            "Find it and memorize it. I will quiz you about the important information there.\n")
    before, after = _insert(_filler(r, PASSKEY_FILLER, n_filler, tokenizer, cycle=True), depth)
    needle = f"The pass key is {key}. Remember it. {key} is the pass key. "
    return _doc([(head + before + needle + after + "\nWhat is the pass key? The pass key is ", False),
                 (key, True), (".\n", False)], depth, {"task": "passkey"})


def _word(r: random.Random, n: int = 6) -> str:
    return "".join(r.choice(string.ascii_lowercase) for _ in range(n))


def make_needle_document(rng, n_filler: int, depth: float, *, num_needles: int = 1, digits: int = 7,
                         haystack: list[str] | None = None, tokenizer=None) -> SyntheticDocument:
    """Needle in a haystack: ``num_needles`` "special magic number" facts; the first is asked for.

    The queried needle sits at ``depth``; distractor needles at random depths.
    ``haystack`` (a list of sentences) replaces the built-in filler sentences.
    """
    r = _as_random(rng)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth must be in [0, 1], got {depth}")
    if num_needles < 1:
        raise ValueError(f"num_needles must be >= 1, got {num_needles}")
    keys = []
    while len(keys) < num_needles:
        w = _word(r)
        if w not in keys:
            keys.append(w)
    values = [str(r.randint(10 ** (digits - 1), 10**digits - 1)) for _ in keys]
    parts = _filler(r, list(haystack or HAYSTACK_SENTENCES), n_filler, tokenizer)
    k0 = round(depth * len(parts))
    inserts = [(k0, 0)] + [(r.randint(0, len(parts)), j) for j in range(1, num_needles)]
    for k, j in sorted(inserts, key=lambda t: (-t[0], t[1])):
        parts.insert(k, f"The special magic number for {keys[j]} is: {values[j]}. ")
    q = f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is: "
    return _doc([("".join(parts) + q, False), (values[0], True), (".\n", False)], depth,
                {"task": "needle", "key": keys[0], "num_needles": num_needles})


def make_mqar_document(rng, n_filler: int = 0, depth: float = 0.0, *, num_pairs: int = 16,
                       num_queries: int = 8, key_len: int = 3, digits: int = 4,
                       tokenizer=None) -> SyntheticDocument:
    """Multi-query associative recall: ``num_pairs`` key=value pairs, filler, then queried keys.

    ``depth`` places the pair list inside the filler; every answer is a value recalled by key.
    """
    r = _as_random(rng)
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries} and {num_pairs}")
    if num_pairs > len(string.ascii_lowercase) ** key_len // 2:
        raise ValueError(f"num_pairs {num_pairs} too large for key_len {key_len}")
    keys: list[str] = []
    while len(keys) < num_pairs:
        k = _word(r, key_len)
        if k not in keys:
            keys.append(k)
    values = {k: str(r.randint(10 ** (digits - 1), 10**digits - 1)) for k in keys}
    pairs = "Remember these pairs: " + ", ".join(f"{k}={values[k]}" for k in keys) + ".\n"
    before, after = _insert(_filler(r, list(HAYSTACK_SENTENCES), n_filler, tokenizer), depth)
    pieces: list[tuple[str, bool]] = [(before + pairs + after + "\nRecall:", False)]
    for k in r.sample(keys, num_queries):
        pieces += [(f" {k}=", False), (values[k], True), (",", False)]
    pieces.append(("\n", False))
    return _doc(pieces, depth, {"task": "mqar", "num_pairs": num_pairs})


def make_copy_document(rng, n_filler: int, depth: float = 0.0, *, tokenizer=None) -> SyntheticDocument:
    """Verbatim copy: a random sequence of 5-digit numbers and nonsense words, then the same
    sequence again, ``n_filler`` characters (or tokens) long.

    Every token of the repetition can only be predicted by finding it in the first copy, the
    densest training signal for the look-up-and-copy attention circuit (an "induction head")
    that passkey and needle retrieval use; a small model forms it within a few hundred steps
    on such data, against thousands on retrieval documents alone. ``depth`` is unused (the
    generators share one signature).
    """
    r = _as_random(rng)
    words, total = [], 0
    cost = (lambda w: len(tokenizer.encode(w))) if tokenizer is not None else len
    while total < max(1, n_filler):
        w = (str(r.randint(10000, 99999)) if r.random() < 0.5 else _word(r, r.randint(3, 7))) + " "
        words.append(w)
        total += cost(w)
    seq = "".join(words).rstrip()
    return _doc([(f"Copy this text exactly.\n{seq}\nCopy: ", False), (seq, True), ("\n", False)], depth,
                {"task": "copy"})


GENERATORS = {"passkey": make_passkey_document, "needle": make_needle_document, "mqar": make_mqar_document,
              "copy": make_copy_document}


def synthetic_texts(src) -> list[str]:
    """Documents for a :class:`data.sources.SyntheticSource` (filler length and depth drawn per document)."""
    if src.task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {src.task!r}; expected one of {sorted(GENERATORS)}")
    if not 0 <= src.min_filler_chars <= src.max_filler_chars:
        raise ValueError(f"need 0 <= min_filler_chars <= max_filler_chars, got "
                         f"{src.min_filler_chars} and {src.max_filler_chars}")
    r = random.Random(src.seed)
    gen = GENERATORS[src.task]
    out = []
    for _ in range(src.num_documents):
        n = r.randint(src.min_filler_chars, src.max_filler_chars)
        out.append(gen(r, n, r.random(), **dict(src.kwargs)).text)
    return out
