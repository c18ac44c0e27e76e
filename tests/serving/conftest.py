"""Fixtures shared by the tests/serving modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.serving.e2e import Serve, pd_and_colocated


@pytest.fixture(scope="session")
def pd_and_colocated_deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Serve]]:
    """The 1P1D and the colocated deployment of e2e.pd_and_colocated, started once per test process for every module
    that compares the two, and for test_api_edge_cases.py (its colocated instance): those modules only send requests
    and read the answers (nothing they do changes what another reads), so they share one pair rather than each
    starting its own (~10 s of five processes importing torch on two cores, for each module). Under `make test`'s
    --dist loadfile each worker that runs one of them starts it, at its first use, and it stays up, idle, until that
    worker ends (~1.7 GB of memory, well under a second of CPU a minute: measured next to the later modules)."""
    yield from pd_and_colocated(tmp_path_factory, "shared")
