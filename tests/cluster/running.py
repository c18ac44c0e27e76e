"""The body of a module fixture that starts a real cluster on this machine (slurm_cluster.py, ray_cluster.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, TypeVar

import pytest


class Cluster(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


C = TypeVar("C", bound=Cluster)


def running(cluster: C, unavailable: type[Exception], needs: str) -> Iterator[C]:
    """`cluster` started (the test skipped, saying why, where `unavailable` says it cannot run here: "needs
    `needs` on this machine"), stopped after the last test."""
    try:
        cluster.start()
    except unavailable as exc:
        cluster.stop()
        pytest.skip(f"needs {needs} on this machine: {exc}")
    try:
        yield cluster
    finally:
        cluster.stop()
