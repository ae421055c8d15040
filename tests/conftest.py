"""Fixtures shared across test files: the realistic input corpus (tests/corpus.py)."""

from __future__ import annotations

import pytest

from corpus import Corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Corpus:
    """Real photos and real speech, each built once per test session on first use."""
    return Corpus(tmp_path_factory.mktemp("corpus"))
