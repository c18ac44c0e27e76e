"""A rank on another node whose rank 0's host vanished (power loss, a network partition): TCP keepalive gives the
link up after LINK_DEAD_AFTER_S and its next read fails with ETIMEDOUT. The rank logged that as any failure,
"TP rank 1 failed: [Errno 110] Connection timed out" with a traceback; it now says which link stopped answering
keepalive probes, for how long, and what to check."""

from __future__ import annotations

import errno
import logging
import os
import socket
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

from pdlaunch.distributed import worker
from pdlaunch.distributed.link_socket import LINK_DEAD_AFTER_S
from pdlaunch.distributed.messages import Ready
from pdlaunch.distributed.worker import serve_rank


class KeepaliveGaveUp(Connection):
    """A TCP link whose reads fail as the kernel fails them once keepalive gave the peer up."""

    def _recv(self, size: int, read: Callable[..., bytes] = os.read) -> Any:
        raise OSError(errno.ETIMEDOUT, os.strerror(errno.ETIMEDOUT))


def built_rank(*args: object) -> tuple[types.SimpleNamespace, None, Ready]:
    """What build_worker_rank gives, without a model: a runner to release, no connector, its Ready."""
    return types.SimpleNamespace(runner=types.SimpleNamespace(release=lambda: None)), None, Ready("e", None, None)


def test_a_link_given_up_by_keepalive_names_rank0s_address_and_what_to_check(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(worker, "build_worker_rank", built_rank)
    with socket.create_server(("127.0.0.1", 0)) as server:
        address = f"127.0.0.1:{server.getsockname()[1]}"  # rank 0's listener
        dialed = socket.create_connection(server.getsockname())
        rank0, _ = server.accept()
    link = KeepaliveGaveUp(dialed.detach())
    rank0.sendall(b"x")  # poll sees the link readable, as it does a link in error
    config = types.SimpleNamespace(parallel=types.SimpleNamespace(tp=2))  # all serve_rank reads of it here
    try:
        with caplog.at_level(logging.ERROR, logger=worker.__name__), pytest.raises(SystemExit) as exited:
            serve_rank(1, config, None, "cpu", "float32", 64, 0, link, os.getppid())  # type: ignore[arg-type]
    finally:
        link.close()
        rank0.close()
    assert exited.value.code == 1
    [record] = [r for r in caplog.records if r.name == worker.__name__]
    assert record.getMessage() == (
        f"TP rank 1: parallel.nodes: the link to rank 0 of the engine at {address} stopped answering keepalive "
        f"probes for {LINK_DEAD_AFTER_S}s (its host, or the network between the nodes, went away) (check that "
        "127.0.0.1 is up and that this node reaches it: a rebooted or powered-off host, a network partition or a "
        "firewall; if it is up, its log says why rank 0 of the engine stopped)")
