"""Fixtures for the NSA op tests."""

import pytest

from nsa.ops import common
from nsa.ops.selected_attention import reference as selected_reference
from nsa.ops.sliding_window_attention import reference as window_reference


@pytest.fixture(params=["default-chunks", "small-chunks"])
def chunk_sizes(request, monkeypatch):
    """Run a test with the default chunking of the torch references (one chunk at test sizes)
    and with the smallest: one ``stride`` of queries per compressed/selection chunk, 16 queries
    per selected-attention plan, one lane per tile and one tile per batch, one window chunk per
    attention call, so that every chunk boundary is crossed and a block that several queries
    of a plan select spans several tiles."""
    if request.param == "small-chunks":
        monkeypatch.setattr(common, "SCORE_BUDGET", 1)
        monkeypatch.setattr(selected_reference, "SCORE_BUDGET", 1)
        monkeypatch.setattr(selected_reference, "QUERIES_PER_PLAN", 16)
        monkeypatch.setattr(selected_reference, "ROWS_PER_TILE", 1)
        monkeypatch.setattr(window_reference, "GATHER_BUDGET", 1)
    return request.param
