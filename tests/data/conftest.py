"""Shared small fixtures: a tiny tokenizer trained on a slice of the standard library."""

import pytest

from data.sources import PyStdlibSource, load_documents
from data.tokenizer import train_tokenizer


@pytest.fixture(scope="session")
def stdlib_texts():
    """The first 40 non-test standard-library files (about 0.5 MB of code and prose)."""
    return list(load_documents(PyStdlibSource(max_documents=40))["text"])


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory, stdlib_texts):
    """A 512-piece BPE trained in about a second; small so that byte fallback is exercised."""
    path = tmp_path_factory.mktemp("tok") / "t512.model"
    return train_tokenizer(stdlib_texts, path, vocab_size=512, input_sentence_size=300, num_threads=1)
