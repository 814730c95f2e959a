"""SentencePiece BPE tokenizers that round-trip text exactly.

Trained with byte fallback and identity normalisation (no dummy prefix, whitespace
kept), so ``decode(encode(text)) == text`` for any Unicode text: code with tabs and
newlines, accents, CJK, emoji. SentencePiece writes spaces as U+2581 ("▁") inside
pieces; a literal U+2581 in the input is therefore encoded as its three UTF-8 byte
tokens so that it does not come back as a space.

Special ids are fixed: unk=0, bos=1, eos=2, pad=3. The ``.model`` file is the whole
tokenizer; it travels with shards, checkpoints and exports.

CLI (Hydra-style overrides): ``python -m data.tokenizer data=pystdlib tokenizer=bpe4096``.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

UNK_ID, BOS_ID, EOS_ID, PAD_ID = 0, 1, 2, 3
_SPACE_MARK = "\u2581"


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _char_index_of_bytes(text: str) -> list[int]:
    """For each UTF-8 byte offset of ``text`` (and its end), the index of the character it is in."""
    if text.isascii():
        return list(range(len(text) + 1))
    out = []
    for i, ch in enumerate(text):
        out += [i] * len(ch.encode("utf-8"))
    return out + [len(text)]


class Tokenizer:
    """A loaded SentencePiece model: ``encode(text) -> list[int]`` without BOS/EOS, ``decode(ids) -> str``."""

    def __init__(self, path: str | Path):
        import sentencepiece as spm

        self.path = str(path)
        if not Path(self.path).is_file():
            raise ValueError(f"tokenizer model {self.path} does not exist")
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.load(self.path)
        except Exception as e:  # sentencepiece raises OSError/RuntimeError with a terse message
            raise ValueError(f"{self.path} is not a valid sentencepiece model: {e}") from e
        self.vocab_size = int(self.sp.get_piece_size())
        self.bos_id, self.eos_id = int(self.sp.bos_id()), int(self.sp.eos_id())
        self.pad_id, self.unk_id = int(self.sp.pad_id()), int(self.sp.unk_id())
        if min(self.bos_id, self.eos_id, self.pad_id) < 0:
            raise ValueError(f"tokenizer {self.path} must define BOS, EOS and PAD ids "
                             f"(got bos={self.bos_id}, eos={self.eos_id}, pad={self.pad_id})")
        mark = [self.sp.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_MARK.encode("utf-8")]
        self._mark_ids = mark if all(i != self.unk_id for i in mark) else None
        self._sha256: str | None = None

    @classmethod
    def load(cls, path: str | Path) -> "Tokenizer":
        return cls(path)

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            self._sha256 = file_sha256(self.path)
        return self._sha256

    def encode(self, text: str) -> list[int]:
        if _SPACE_MARK not in text or self._mark_ids is None:
            return self.sp.encode(text)
        parts = text.split(_SPACE_MARK)
        ids = list(self.sp.encode(parts[0]))
        for part in parts[1:]:
            ids += self._mark_ids
            ids += self.sp.encode(part)
        return ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        if any(_SPACE_MARK in t for t in texts):
            return [self.encode(t) for t in texts]
        return self.sp.encode(texts)

    def encode_scored(self, text: str, no_loss_spans) -> tuple[list[int], list[int]]:
        """``encode(text)`` and, per token, 1 if it is trained on or 0 if it overlaps one of the
        ``[start, end)`` character spans of ``no_loss_spans`` (a piece such as "▁word" belongs to
        the span that holds its word)."""
        unscored = bytearray(len(text) + 1)
        for a, b in no_loss_spans:
            if not 0 <= a <= b <= len(text):
                raise ValueError(f"no-loss span ({a}, {b}) is outside a text of {len(text)} characters")
            unscored[a:b] = b"\1" * (b - a)
        ids, scored = [], []
        base = 0  # character offset of the part being encoded
        for n, part in enumerate(text.split(_SPACE_MARK) if self._mark_ids is not None else [text]):
            if n:  # the literal U+2581 before this part: its byte tokens
                ids += self._mark_ids
                scored += [1 - unscored[base - 1]] * len(self._mark_ids)
            char_at = _char_index_of_bytes(part)
            for piece in self.sp.encode(part, out_type="proto").pieces:
                a, b = char_at[piece.begin], char_at[piece.end]
                ids.append(piece.id)
                scored.append(0 if any(unscored[base + a : base + max(b, a + 1)]) else 1)
            base += len(part) + 1
        return ids, scored

    def decode(self, ids: Iterable[int]) -> str:
        return self.sp.decode([int(i) for i in ids])

    def check_model_vocab(self, model_vocab_size: int) -> None:
        """Raise ValueError unless a model with ``model_vocab_size`` embeddings can take these ids."""
        if model_vocab_size < self.vocab_size:
            raise ValueError(f"model vocab_size {model_vocab_size} is smaller than the tokenizer's "
                             f"{self.vocab_size} ({self.path})")

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"


@dataclass
class TokenizerConfig:
    """`configs/tokenizer/<name>.yaml`. An existing file at ``path`` is loaded, else one is trained."""

    name: str = "bpe4096"
    path: str | None = None  # default: outputs/tokenizers/<name>.model
    vocab_size: int | None = 4096  # null: accept whatever an existing file has
    model_type: str = "bpe"
    input_sentence_size: int = 2000  # text chunks sampled for training; keeps the demo at seconds
    chunk_chars: int = 4096  # documents are cut at line ends into chunks of at most this many chars
    character_coverage: float = 0.9995
    split_digits: bool = True
    num_threads: int = 2
    seed: int = 0

    def model_path(self) -> Path:
        return Path(self.path) if self.path else Path("outputs/tokenizers") / f"{self.name}.model"


def tokenizer_config_from_dict(d) -> TokenizerConfig:
    from data.sources import to_plain

    d = dict(to_plain(d))
    known = set(TokenizerConfig.__dataclass_fields__)
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in tokenizer config")
    return TokenizerConfig(**d)


def _chunks(text: str, max_chars: int) -> Iterator[str]:
    """Cut ``text`` into pieces of at most ``max_chars`` characters, at line ends where possible."""
    start = 0
    while start < len(text):
        end = min(len(text), start + max_chars)
        if end < len(text):
            cut = text.rfind("\n", start, end)
            end = cut + 1 if cut > start else end
        yield text[start:end]
        start = end


def train_tokenizer(texts: Iterable[str], out_path: str | Path, *, vocab_size: int = 4096,
                    model_type: str = "bpe", input_sentence_size: int = 2000, chunk_chars: int = 4096,
                    character_coverage: float = 0.9995, split_digits: bool = True, num_threads: int = 2,
                    seed: int = 0) -> Tokenizer:
    """Train a byte-fallback, identity-normalised SentencePiece model on a sample of ``texts``.

    The documents are cut into chunks (SentencePiece skips over-long sentences) and
    ``input_sentence_size`` chunks are sampled with ``seed``. Writes ``out_path`` atomically.
    """
    import sentencepiece as spm

    if vocab_size < 260 + 4:
        raise ValueError(f"vocab_size {vocab_size} is too small for 256 byte pieces and 4 specials")
    chunks = [c for t in texts for c in _chunks(t, chunk_chars)]
    if not chunks:
        raise ValueError("cannot train a tokenizer on an empty source (no text)")
    if input_sentence_size and len(chunks) > input_sentence_size:
        chunks = random.Random(seed).sample(chunks, input_sentence_size)
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(chunks), model_writer=model, vocab_size=vocab_size, model_type=model_type,
            byte_fallback=True, normalization_rule_name="identity", add_dummy_prefix=False,
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, split_digits=split_digits,
            max_sentence_length=chunk_chars * 4 + 16, character_coverage=character_coverage,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=PAD_ID, hard_vocab_limit=False,
            num_threads=num_threads, minloglevel=2, shuffle_input_sentence=False)
    except RuntimeError as e:  # e.g. more distinct characters than vocab_size leaves room for
        raise ValueError(f"sentencepiece could not train {out_path}: {e}") from e
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    _sidecar(out_path).write_text(json.dumps({"vocab_size": vocab_size, "model_type": model_type,
                                              "input_sentence_size": input_sentence_size, "seed": seed}))
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_bytes(model.getvalue())
    tmp.replace(out_path)
    return Tokenizer(out_path)


def _sidecar(model_path: Path) -> Path:
    return model_path.with_name(model_path.name + ".json")


def requested_vocab_size(model_path: str | Path) -> int | None:
    """The vocab size a model trained here was asked for (from ``<model>.json``), None for foreign models."""
    side = _sidecar(Path(model_path))
    return json.loads(side.read_text()).get("vocab_size") if side.is_file() else None


def get_tokenizer(tok_cfg, data_cfg=None, *, log=print) -> Tokenizer:
    """Load the tokenizer at ``tok_cfg``'s path, training it on ``data_cfg``'s source if it is missing."""
    from data.sources import DataConfig, data_config_from_dict, load_documents

    cfg = tok_cfg if isinstance(tok_cfg, TokenizerConfig) else tokenizer_config_from_dict(tok_cfg)
    path = cfg.model_path()
    if path.is_file():
        tok = Tokenizer(path)
        requested = requested_vocab_size(path)  # SentencePiece may stop below the requested size
        if cfg.vocab_size is not None and cfg.vocab_size != (requested or tok.vocab_size):
            raise ValueError(f"tokenizer {path} has vocab_size {requested or tok.vocab_size} but tokenizer "
                             f"{cfg.name!r} asks for {cfg.vocab_size}: set tokenizer.vocab_size="
                             f"{requested or tok.vocab_size} (or null), or point tokenizer.path elsewhere to "
                             f"train a new one")
        return tok
    if data_cfg is None:
        raise ValueError(f"tokenizer {path} does not exist and no data source was given to train it on")
    dcfg = data_cfg if isinstance(data_cfg, DataConfig) else data_config_from_dict(data_cfg)
    if cfg.vocab_size is None:
        raise ValueError(f"tokenizer {path} does not exist; set tokenizer.vocab_size to train one")
    log(f"training tokenizer {cfg.name} (vocab {cfg.vocab_size}) on {dcfg.name} -> {path}")
    docs = load_documents(dcfg.source)
    return train_tokenizer(docs["text"], path, vocab_size=cfg.vocab_size, model_type=cfg.model_type,
                           input_sentence_size=cfg.input_sentence_size, chunk_chars=cfg.chunk_chars,
                           character_coverage=cfg.character_coverage, split_digits=cfg.split_digits,
                           num_threads=cfg.num_threads, seed=cfg.seed)


def main(argv: list[str] | None = None) -> None:
    """``python -m data.tokenizer data=<source> tokenizer=<name> [key=value ...]``."""
    from data.cli import compose

    cfg = compose(argv, "python -m data.tokenizer", "Train (or load) a SentencePiece tokenizer on a data source.")
    tok = get_tokenizer(cfg.tokenizer, cfg.data)
    sample = "def f(x):\n\treturn x  # héllo ✓\n"
    ok = tok.decode(tok.encode(sample)) == sample
    print(f"{tok.path}: vocab {tok.vocab_size}, bos {tok.bos_id}, eos {tok.eos_id}, pad {tok.pad_id}, "
          f"sha256 {tok.sha256[:12]}, round-trip {'ok' if ok else 'FAILED'}")


if __name__ == "__main__":
    main()
