"""A stalled process whose listen backlog is full (clients kept connecting to a stopped proxy) no longer
completes a connect: the probe times out connecting, not reading. That is still a stall, not a process gone."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from pdlaunch.launcher.stall_watch import StallWatch


@pytest.fixture()
def full_backlog() -> Iterator[str]:
    """The /health URL of a listener that never accepts and whose accept queue is full."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    address = listener.getsockname()
    queued: list[socket.socket] = []
    try:
        for _ in range(4):  # the first fills the queue (backlog 0 holds one), the rest get their SYN dropped
            client = socket.socket()
            client.setblocking(False)
            client.connect_ex(address)
            queued.append(client)
        yield f"http://127.0.0.1:{address[1]}/health"
    finally:
        for client in queued:
            client.close()
        listener.close()


def test_a_connect_that_times_out_is_a_stall(full_backlog: str) -> None:
    now = [100.0]
    watch = StallWatch({"proxy": full_backlog}, timeout_s=0.3, clock=lambda: now[0])
    try:
        watch.watch("proxy", True)
        watch.probe("proxy")
        now[0] = 105.0
        watch.probe("proxy")
        assert watch.stalled_for("proxy") == pytest.approx(5.0)
    finally:
        watch.stop()
