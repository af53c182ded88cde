"""Shared pytest fixtures (helpers live in testdata.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from testdata import PLUS_DATA, make_synthetic_sequence, plus_file  # noqa: F401  (re-exported)
from FreehandUSLib import TrackedSequence


@pytest.fixture
def plus_data() -> Path:
    """The ../shared/data/plus folder (skip when absent)."""
    if not PLUS_DATA.is_dir():
        pytest.skip(f"PLUS test data folder not found: {PLUS_DATA}")
    return PLUS_DATA


@pytest.fixture
def synthetic_sequence() -> TrackedSequence:
    return make_synthetic_sequence()
