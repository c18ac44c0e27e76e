"""Fixtures of the connector-process tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.kv_transfer.pd_procs import ConnectorProcess


@pytest.fixture
def close_all() -> Iterator[list[ConnectorProcess]]:
    """The connector processes a test adds to it, closed when the test ends."""
    procs: list[ConnectorProcess] = []
    yield procs
    for p in procs:
        p.close()
