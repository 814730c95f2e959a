"""Fixtures for the trainer tests: one tiny prepared dataset per session."""

import pytest

from tests.train.helpers import make_dataset


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("train-data"))
