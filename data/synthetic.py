"""Synthetic long-context documents: passkey retrieval, needle retrieval, MQAR, verbatim copy.

Each generator returns a :class:`SyntheticDocument` whose ``text`` is the full training
document (prompt followed by the answer) and whose ``answer_spans`` locate every answer
in ``text``, so the same document serves as a mixture source for training and, cut at
``prompt``, as an evaluation item. ``no_loss_spans`` locate the random content no model can
predict (the text to be copied, the key-value pairs, a key's first mention): training
leaves its tokens out of the loss (see ``SyntheticSource.mask_unpredictable``), since fitting
them teaches that a word just seen will not come again, the opposite of the look-up the
answers need. Lengths are set by ``n_filler``: characters, or tokens
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

# Words for copy and MQAR documents: common English words and code identifiers, each one piece
# (with its leading space) in the default bpe4096 tokenizer trained on the standard library
# (tests/data/test_synthetic.py checks the demo tokenizer). A random letter string or number is
# cut into one-character pieces instead, so that every look-up would need a match on several
# tokens over a ~36-symbol alphabet (see make_copy_document).
WORDS = tuple("""
    act action add address after all allow anchor and any arch archive are argument assert auto back
    base before bit block body bound break browser buffer build builtin button byte bytes cache call
    callback can cancel cannot case change changed char chars check child chunk class classes close
    closed code color column command commands comment compile compiler complete compress config
    const contain content context control convert cookie copy count create current data date day
    debug decode default defaults defined dialog digits display domain done edit element else empty
    encode encoded encoding end entry error errors escape even event events except exist exists exit
    expected extra fail field fields file filename files fill filter final find first fix flag flags
    float font for form format found frame from full function future get global globals group hand
    handle handler has hash header headers help here high host ignore image import include indent
    index info initial input insert instance integer into invalid item items its join just key keys
    label last left length level library like limit line lines link list literal load local locale
    locals lock log logger long loop low mail main make man manager map mapping mark master match
    max member menu message method methods min missing mode module modules month most multi name
    names negative new next node nodes normal not now number object objects off offset old one only
    open option options order other out output over pack package parent parse parser part parts pass
    path paths pattern per pipe place platform point policy port position prefix present print
    process protocol proxy put queue quote raise range raw read release remove replace request reset
    response rest result return right root run running save scheme screen script search second
    seconds section see select selector self send sent sequence server set sets setup shared show
    sign signal simple size skip socket sort source space special specific split stack star start
    state stop stream strict string strings strip sub suffix super sure system table tag tail target
    task test tests text that the this thread time timeout title token top total tree true try type
    types update use used user valid value values variable version view wait warning warnings way
    week when where which while widget width win window with word work wrap write written year zero
""".split())


@dataclass
class SyntheticDocument:
    """text = prompt + answers; answer_spans are (start, end) char offsets of each answer in text,
    no_loss_spans those of the unpredictable random content (not trained on)."""

    text: str
    answers: list[str]
    answer_spans: list[tuple[int, int]]
    depth: float = 0.0  # relative position of the (first) needle inside the filler, in [0, 1]
    meta: dict = field(default_factory=dict)
    no_loss_spans: list[tuple[int, int]] = field(default_factory=list)

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


ANSWER, RANDOM = "answer", "random"  # piece roles for _doc; any other role is plain text
# a copy document's instruction before the list and its question before the copy (eval.niah's copy
# needle uses the same words, so a model trained on copies meets them there)
COPY_INSTRUCTION, COPY_QUESTION = "Copy this text exactly: ", "Copy:"


def _doc(pieces: list[tuple[str, str | None]], depth: float, meta: dict) -> SyntheticDocument:
    """Join (text, role) pieces, recording the spans of ANSWER and of RANDOM (no-loss) pieces."""
    text, answers, spans, no_loss = "", [], [], []
    for s, role in pieces:
        if role == ANSWER:
            answers.append(s)
            spans.append((len(text), len(text) + len(s)))
        elif role == RANDOM and s:
            no_loss.append((len(text), len(text) + len(s)))
        text += s
    return SyntheticDocument(text=text, answers=answers, answer_spans=spans, depth=depth, meta=meta,
                             no_loss_spans=no_loss)


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
    tail = (f". Remember it. {key} is the pass key. " + after).rstrip(" ")
    # no space before the question: the lone space piece before a digit then only ever precedes the key
    return _doc([(head + before + "The pass key is ", None), (key, RANDOM),
                 (tail + "\nWhat is the pass key? The pass key is ", None), (key, ANSWER), (".\n", None)],
                depth, {"task": "passkey"})


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
    parts: list = [[(p, None)] for p in _filler(r, list(haystack or HAYSTACK_SENTENCES), n_filler, tokenizer)]
    k0 = round(depth * len(parts))
    inserts = [(k0, 0)] + [(r.randint(0, len(parts)), j) for j in range(1, num_needles)]
    for k, j in sorted(inserts, key=lambda t: (-t[0], t[1])):
        parts.insert(k, [("The special magic number for ", None), (keys[j], RANDOM), (" is: ", None),
                         (values[j], RANDOM), (". ", None)])
    q = f"\nWhat is the special magic number for {keys[0]}? The special magic number for {keys[0]} is: "
    return _doc([piece for part in parts for piece in part] + [(q, None), (values[0], ANSWER), (".\n", None)],
                depth, {"task": "needle", "key": keys[0], "num_needles": num_needles})


def make_mqar_document(rng, n_filler: int = 0, depth: float = 0.0, *, num_pairs: int = 16,
                       num_queries: int = 8, symbols: str = "words", key_len: int = 3, digits: int = 4,
                       tokenizer=None) -> SyntheticDocument:
    """Multi-query associative recall: ``num_pairs`` key-value pairs, filler, then queried keys.

    ``symbols="words"``: keys and values are distinct :data:`WORDS` ("Remember these pairs: path
    token, value queue, ...", then "Recall: value queue, ..."), so each value follows its key
    directly, as in the MQAR benchmark's "k v" sequences. ``"chars"``: random ``key_len``-letter
    keys and ``digits``-digit values ("xkw=5260"), which a sub-word tokenizer cuts into single
    characters. ``depth`` places the pair list inside the filler; every answer is a value.
    """
    r = _as_random(rng)
    if not 1 <= num_queries <= num_pairs:
        raise ValueError(f"need 1 <= num_queries <= num_pairs, got {num_queries} and {num_pairs}")
    if symbols == "words":
        if 2 * num_pairs > len(WORDS):
            raise ValueError(f"num_pairs {num_pairs} too large: {len(WORDS)} words give at most {len(WORDS) // 2}")
        drawn = r.sample(WORDS, 2 * num_pairs)
        keys, values, sep = drawn[:num_pairs], dict(zip(drawn[:num_pairs], drawn[num_pairs:], strict=True)), " "
    elif symbols == "chars":
        if num_pairs > len(string.ascii_lowercase) ** key_len // 2:
            raise ValueError(f"num_pairs {num_pairs} too large for key_len {key_len}")
        keys = []
        while len(keys) < num_pairs:
            k = _word(r, key_len)
            if k not in keys:
                keys.append(k)
        values = {k: str(r.randint(10 ** (digits - 1), 10**digits - 1)) for k in keys}
        sep = "="
    else:
        raise ValueError(f"symbols must be 'words' or 'chars', got {symbols!r}")
    pairs = ", ".join(f"{k}{sep}{values[k]}" for k in keys)
    before, after = _insert(_filler(r, list(HAYSTACK_SENTENCES), n_filler, tokenizer), depth)
    pieces: list[tuple[str, str | None]] = [(before + "Remember these pairs: ", None), (pairs, RANDOM),
                                            (".\n" + after + "\nRecall:", None)]
    for k in r.sample(keys, num_queries):
        pieces += [(f" {k}{sep}", None), (values[k], ANSWER), (",", None)]
    pieces.append(("\n", None))
    return _doc(pieces, depth, {"task": "mqar", "num_pairs": num_pairs, "symbols": symbols})


def make_copy_document(rng, n_filler: int, depth: float = 0.0, *, symbols: str = "words",
                       tokenizer=None, num_words=None) -> SyntheticDocument:
    """Verbatim copy: a random sequence ``n_filler`` characters (or tokens) long, then the same
    sequence again.

    Every token of the repetition can only be predicted by finding it in the first copy, the
    densest training signal for the look-up-and-copy attention circuit (an "induction head")
    that passkey and needle retrieval use. ``symbols="words"``: distinct :data:`WORDS` (drawn
    again only once all are used), so the token after the previous occurrence of the current
    token is always the answer, the one-token match a small model learns first. ``"chars"``:
    5-digit numbers and random 3-7 letter strings, which a sub-word tokenizer cuts into single
    characters: a look-up then needs a match on several tokens (an ideal one-token look-up,
    ``eval.retrieval.one_token_lookup``, predicts ~15% of them). Without ``num_words``,
    ``depth`` is unused (the generators share one signature).

    ``num_words`` (an int, or ``[lo, hi]`` drawn per document): a haystack copy instead, the copy
    needle of ``eval.niah`` (``needle=copy``, ``corpus=passkey_filler``) as a training document:
    that many distinct words hidden at ``depth`` in ``n_filler`` of the passkey filler, and the
    copy after it, so the list lies anywhere from just before the copy to the document's start.
    """
    r = _as_random(rng)
    if symbols not in ("words", "chars"):
        raise ValueError(f"symbols must be 'words' or 'chars', got {symbols!r}")
    if num_words is not None:
        if symbols != "words":
            raise ValueError(f"a haystack copy (num_words) is a list of words, got symbols={symbols!r}")
        return _haystack_copy(r, n_filler, depth, num_words, tokenizer)
    words, total, pool = [], 0, []
    cost = (lambda w: len(tokenizer.encode(w))) if tokenizer is not None else len
    while total < max(1, n_filler):
        if symbols == "words":
            if not pool:
                pool = r.sample(WORDS, len(WORDS))
            w = pool.pop() + " "
        else:
            w = (str(r.randint(10000, 99999)) if r.random() < 0.5 else _word(r, r.randint(3, 7))) + " "
        words.append(w)
        total += cost(w)
    seq = "".join(words).rstrip()
    return _doc([(COPY_INSTRUCTION, None), (seq, RANDOM), (f"\n{COPY_QUESTION} ", None), (seq, ANSWER), ("\n", None)], depth,
                {"task": "copy", "symbols": symbols})


def _haystack_copy(r: random.Random, n_filler: int, depth: float, num_words, tokenizer) -> SyntheticDocument:
    """``make_copy_document(num_words=...)``: eval.niah's copy needle text, ending in the copy."""
    lo, hi = (num_words, num_words) if isinstance(num_words, int) else tuple(num_words)
    if not 1 <= lo <= hi <= len(WORDS):
        raise ValueError(f"num_words must be in [1, {len(WORDS)}] (an int or [lo, hi]), got {num_words}")
    seq = " ".join(r.sample(WORDS, r.randint(lo, hi)))
    before, after = _insert(_filler(r, PASSKEY_FILLER, n_filler, tokenizer, cycle=True), depth)
    # eval.niah's prompt: haystack with "<instruction><words>\n" at a filler boundary, its trailing
    # space dropped before the question "\nCopy:", the answer after one space
    return _doc([(before + COPY_INSTRUCTION, None), (seq, RANDOM),
                 ("\n" + after.rstrip(" ") + f"\n{COPY_QUESTION} ", None), (seq, ANSWER), ("\n", None)], depth,
                {"task": "copy", "symbols": "words", "haystack": True})


GENERATORS = {"passkey": make_passkey_document, "needle": make_needle_document, "mqar": make_mqar_document,
              "copy": make_copy_document}


def synthetic_documents(src) -> list[SyntheticDocument]:
    """Documents for a :class:`data.sources.SyntheticSource` (filler length and depth drawn per document)."""
    return draw_documents(src.task, src.num_documents, src.min_filler_chars, src.max_filler_chars,
                          random.Random(src.seed), src.min_depth, src.max_depth, src.kwargs)


def synthetic_texts(src) -> list[str]:
    """The texts of :func:`synthetic_documents`."""
    return [d.text for d in synthetic_documents(src)]


def draw_documents(task: str, n: int, min_filler: int, max_filler: int, rng: random.Random,
                   min_depth: float = 0.0, max_depth: float = 1.0, kwargs=None) -> list[SyntheticDocument]:
    """``n`` documents of ``task``: filler lengths uniform in ``[min_filler, max_filler]`` (characters),
    depths uniform in ``[min_depth, max_depth]``; ``kwargs`` go to the generator."""
    if task not in GENERATORS:
        raise ValueError(f"unknown synthetic task {task!r}; expected one of {sorted(GENERATORS)}")
    if not 0 <= min_filler <= max_filler:
        raise ValueError(f"need 0 <= min_filler_chars <= max_filler_chars, got {min_filler} and {max_filler}")
    if not 0.0 <= min_depth <= max_depth <= 1.0:
        raise ValueError(f"need 0 <= min_depth <= max_depth <= 1, got {min_depth} and {max_depth}")
    gen = GENERATORS[task]
    out = []
    for _ in range(n):
        length = rng.randint(min_filler, max_filler)
        out.append(gen(rng, length, min_depth + (max_depth - min_depth) * rng.random(), **dict(kwargs or {})))
    return out
