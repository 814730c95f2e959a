"""Text sources: the schema of `configs/data/*.yaml` and how each source becomes documents.

A source turns into a `datasets.Dataset` with one string column ``text``, one row per
document, in a deterministic order. Kinds:

* ``pystdlib``  every ``.py`` file of the running Python's standard library (no network).
* ``local``     text / jsonl / parquet files via ``datasets.load_dataset(data_files=...)``.
* ``hub``       any dataset by name via ``datasets`` (streaming allowed; needs network).
* ``synthetic`` passkey / needle / MQAR documents from :mod:`data.synthetic`.
* ``mixture``   weighted interleaving of the sources above.

`datasets` is imported inside the functions that need it (it is a heavy import).
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

TEST_DIR_NAMES = ("test", "tests", "idle_test")
NO_LOSS = "no_loss"  # column of [start, end) character spans that carry no loss


@dataclass
class PyStdlibSource:
    """Every ``.py`` file of the standard library, one document per file, sorted by path.

    tests: "exclude" (default), "only" (the test suites as a separate corpus) or "include".
    max_documents: keep the first N files (for small runs and tests).
    """

    kind: str = "pystdlib"
    tests: str = "exclude"
    max_documents: int | None = None
    root: str | None = None  # defaults to sysconfig's stdlib directory


@dataclass
class LocalSource:
    """Files read through ``datasets.load_dataset(format, data_files=...)``.

    format: "text" (one document per file), "json" (jsonl), "parquet" or "csv";
    inferred from the first file's extension when null. text_field names the column.
    """

    kind: str = "local"
    data_files: Any = None  # str | list[str] (globs allowed)
    format: str | None = None
    text_field: str = "text"
    max_documents: int | None = None


@dataclass
class HubSource:
    """A dataset by name through ``datasets`` (network needed; never used in tests).

    With streaming the first ``max_documents`` rows are materialised.
    """

    kind: str = "hub"
    path: str = ""
    name: str | None = None
    split: str = "train"
    revision: str | None = None
    text_field: str = "text"
    streaming: bool = True
    max_documents: int | None = 100_000


@dataclass
class SyntheticSource:
    """Synthetic long-context documents (see :mod:`data.synthetic`).

    task: "passkey" | "needle" | "mqar" | "copy"; filler lengths in characters are drawn
    uniformly from [min_filler_chars, max_filler_chars], needle depths from [min_depth, max_depth]
    (0: the needle right after the document's head, far from the question); kwargs go to the
    generator. mask_unpredictable: no loss on the random content no model can predict (the text to
    be copied, the key-value pairs, a key's first mention; ``SyntheticDocument.no_loss_spans``).
    Fitting that content teaches that a word just seen will not come again, which works against
    the look-up the answers need: trained on it, a tiny model learns copy several times more slowly.
    """

    kind: str = "synthetic"
    task: str = "passkey"
    num_documents: int = 1000
    min_filler_chars: int = 1000
    max_filler_chars: int = 8000
    min_depth: float = 0.0
    max_depth: float = 1.0
    seed: int = 0
    kwargs: dict = field(default_factory=dict)
    mask_unpredictable: bool = True


@dataclass
class MixtureComponent:
    weight: float
    source: "Source"


@dataclass
class MixtureSource:
    """Weighted mixture: documents are drawn from components with probability ∝ weight.

    stopping: "first_exhausted" (stop when a component runs out) or "all_exhausted"
    (oversample the small ones until every component was seen entirely).
    """

    kind: str = "mixture"
    components: list = field(default_factory=list)  # list[MixtureComponent]
    stopping: str = "first_exhausted"
    seed: int = 0


Source = Union[PyStdlibSource, LocalSource, HubSource, SyntheticSource, MixtureSource]
_KINDS = {c.kind: c for c in (PyStdlibSource, LocalSource, HubSource, SyntheticSource, MixtureSource)}


@dataclass
class DataConfig:
    """One `configs/data/<name>.yaml`: a source plus how it is split and sharded."""

    name: str
    source: Source
    validation_fraction: float = 0.01
    min_validation_documents: int = 1
    seed: int = 0
    num_proc: int = 2
    shard_max_tokens: int = 100_000_000
    out_dir: str | None = None


def to_plain(cfg: Any) -> Any:
    """DictConfig / dataclass / mapping -> plain dict (lists and scalars pass through)."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return dataclasses.asdict(cfg)
    if type(cfg).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def source_from_dict(d: Any) -> Source:
    """Build a source dataclass from its YAML mapping; unknown kinds or keys are ValueErrors."""
    d = dict(to_plain(d))
    kind = d.get("kind")
    if kind not in _KINDS:
        raise ValueError(f"unknown data source kind {kind!r}; expected one of {sorted(_KINDS)}")
    cls = _KINDS[kind]
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} for data source kind {kind!r}")
    if kind == "mixture":
        comps = d.get("components") or []
        if not comps:
            raise ValueError("a mixture source needs at least one component")
        parsed = []
        for c in comps:
            c = dict(c)
            if "source" not in c or "weight" not in c:
                raise ValueError(f"each mixture component needs 'weight' and 'source', got {sorted(c)}")
            if not float(c["weight"]) > 0:
                raise ValueError(f"mixture weights must be > 0, got {c['weight']}")
            parsed.append(MixtureComponent(float(c["weight"]), source_from_dict(c["source"])))
        d["components"] = parsed
    return cls(**d)


def data_config_from_dict(d: Any) -> DataConfig:
    """Build a :class:`DataConfig` from a `configs/data/*.yaml` mapping (dict or DictConfig)."""
    d = dict(to_plain(d))
    if "name" not in d or "source" not in d:
        raise ValueError(f"a data config needs 'name' and 'source', got keys {sorted(d)}")
    known = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = set(d) - known
    if unknown:
        raise ValueError(f"unknown keys {sorted(unknown)} in data config {d['name']!r}")
    d["source"] = source_from_dict(d["source"])
    cfg = DataConfig(**d)
    if not 0.0 <= cfg.validation_fraction < 1.0:
        raise ValueError(f"validation_fraction must be in [0, 1), got {cfg.validation_fraction}")
    return cfg


# ---------------------------------------------------------------- loading documents


def stdlib_files(src: PyStdlibSource) -> list[Path]:
    """The standard library's ``.py`` files selected by ``src``, sorted by relative path."""
    if src.tests not in ("exclude", "only", "include"):
        raise ValueError(f"pystdlib tests must be 'exclude', 'only' or 'include', got {src.tests!r}")
    root = Path(src.root or sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ValueError(f"pystdlib root {root} is not a directory")
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "dist-packages", "__pycache__"))
        is_test = any(p in TEST_DIR_NAMES for p in rel.parts)
        for fn in sorted(filenames):
            if not fn.endswith(".py"):
                continue
            test_file = is_test or fn.startswith("test_")
            if (src.tests == "exclude" and test_file) or (src.tests == "only" and not test_file):
                continue
            out.append(rel / fn)
    out.sort()
    if src.max_documents is not None:
        out = out[: src.max_documents]
    return [root / p for p in out]


def _read_texts(paths: list[Path]) -> list[str]:
    texts = []
    for p in paths:
        try:
            texts.append(p.read_text(encoding="utf-8"))
        except UnicodeDecodeError:  # a handful of stdlib files are latin-1 encoded test data
            continue
    return texts


def _local_format(src: LocalSource) -> str:
    if src.format:
        return src.format
    files = src.data_files
    first = files if isinstance(files, str) else (list(files.values())[0] if isinstance(files, dict) else files[0])
    first = first if isinstance(first, str) else first[0]
    for ext, fmt in ((".jsonl", "json"), (".json", "json"), (".parquet", "parquet"), (".csv", "csv"),
                     (".txt", "text"), (".md", "text"), (".py", "text")):
        if first.endswith(ext):
            return fmt
    raise ValueError(f"cannot infer the format of {first!r}; set format: text|json|parquet|csv")


def _select_text(ds, field_name: str, what: str):
    if field_name not in ds.column_names:
        raise ValueError(f"{what} has no text field {field_name!r}; columns are {ds.column_names}")
    ds = ds.select_columns([field_name])
    return ds.rename_column(field_name, "text") if field_name != "text" else ds


def load_documents(src: Source):
    """Materialise a source as a ``datasets.Dataset`` with a ``text`` column (empty rows dropped)
    and, where a synthetic source masks its random content, a ``no_loss`` column: per document
    the ``[start, end)`` character spans whose tokens carry no loss (empty for other documents)."""
    import datasets

    spans_feature = datasets.Sequence(datasets.Sequence(datasets.Value("int64")))

    if isinstance(src, PyStdlibSource):
        ds = datasets.Dataset.from_dict({"text": _read_texts(stdlib_files(src))})
    elif isinstance(src, LocalSource):
        if not src.data_files:
            raise ValueError("a local source needs data_files")
        fmt = _local_format(src)
        kwargs = {"sample_by": "document"} if fmt == "text" else {}
        ds = datasets.load_dataset(fmt, data_files=src.data_files, split="train", **kwargs)
        ds = _select_text(ds, src.text_field, f"local source {src.data_files!r}")
        if src.max_documents is not None:
            ds = ds.select(range(min(src.max_documents, len(ds))))
    elif isinstance(src, HubSource):
        if not src.path:
            raise ValueError("a hub source needs path (the dataset name)")
        ds = datasets.load_dataset(src.path, src.name, split=src.split, revision=src.revision,
                                   streaming=src.streaming)
        if src.streaming:
            if src.max_documents is None:
                raise ValueError("a streaming hub source needs max_documents")
            rows = []
            for r in ds.take(src.max_documents):
                if src.text_field not in r:
                    raise ValueError(f"hub dataset {src.path!r} has no text field {src.text_field!r}; "
                                     f"fields are {sorted(r)}")
                rows.append(r[src.text_field])
            ds = datasets.Dataset.from_dict({"text": rows})
        else:
            ds = _select_text(ds, src.text_field, f"hub dataset {src.path!r}")
            if src.max_documents is not None:
                ds = ds.select(range(min(src.max_documents, len(ds))))
    elif isinstance(src, SyntheticSource):
        from data.synthetic import synthetic_documents

        docs = synthetic_documents(src)
        ds = datasets.Dataset.from_dict({"text": [d.text for d in docs]})
        if src.mask_unpredictable:
            ds = ds.add_column(NO_LOSS, [[list(sp) for sp in d.no_loss_spans] for d in docs],
                               feature=spans_feature)
    elif isinstance(src, MixtureSource):
        parts = [load_documents(c.source) for c in src.components]
        with_spans = any(NO_LOSS in p.column_names for p in parts)
        features = datasets.Features({"text": datasets.Value("string"),  # parquet may say large_string
                                      **({NO_LOSS: spans_feature} if with_spans else {})})
        parts = [(p.add_column(NO_LOSS, [[]] * len(p), feature=spans_feature)
                  if with_spans and NO_LOSS not in p.column_names else p).cast(features) for p in parts]
        total = sum(c.weight for c in src.components)
        ds = datasets.interleave_datasets(parts, probabilities=[c.weight / total for c in src.components],
                                          seed=src.seed, stopping_strategy=src.stopping)
    else:
        raise ValueError(f"not a data source: {src!r}")
    ds = ds.filter(lambda t: t is not None and len(t) > 0, input_columns="text")
    return ds
