"""Fixtures the cluster backend tests share."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest


@pytest.fixture
def term_guard() -> Iterator[None]:
    """A SIGTERM that arrives after run_slurm restored the handlers must not end pytest."""
    previous = signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
