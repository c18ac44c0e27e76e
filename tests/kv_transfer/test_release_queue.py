"""A decode's hold releases (release_unloaded: a request that ended before its KV load started tells the prefill) run
on threads of their own, never on the loader threads that real KV loads use: many aborted queued requests against a
prefill that does not answer (each release waits up to RELEASE_TIMEOUT_SECONDS) queued ahead of real loads, whose
deadlines run from start_load, and those timed out. Past a cap, releases are dropped with a log line counting them
(the prefill's lease frees those blocks).
Real NIXL (UCX over DRAM): a prefill connector in its own process, the decode connector in this one, and a side
channel that accepts connections but never answers (a hung prefill).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Iterator

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.decode.context import MAX_PENDING_RELEASES, RELEASE_TIMEOUT_SECONDS, HoldReleases
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.pd_procs import ConnectorProcess, make_spec, wait_events

TRANSFER_S = 6.0  # the load's deadline: far below the releases queued ahead of it on 4 loader threads
SPEC = dict(block_size=4, groups=1, num_blocks=24)
PROMPT = list(range(100, 117))  # 17 tokens: 4 blocks move


def _config() -> DeploymentConfig:
    kv = KVTransferConfig(transfer_mode="pull", handshake_timeout_seconds=TRANSFER_S,
                          transfer_timeout_seconds=TRANSFER_S, engine_id="unused")
    return secured(DeploymentConfig(device="cpu", kv_transfer=kv))


@pytest.fixture(scope="module")
def prefill() -> Iterator[ConnectorProcess]:
    side = ConnectorProcess(_config(), InstanceSpec(role="prefill", port=1, engine_id="engine-P", device="cpu"),
                            seed=1, **SPEC)
    try:
        yield side
    finally:
        side.close()


@pytest.fixture
def decode() -> Iterator[DecodeSide]:
    connector = create_connector(_config(), InstanceSpec(role="decode", port=2, engine_id="engine-D", device="cpu"))
    assert isinstance(connector, DecodeSide)
    connector.register_kv_caches(make_spec(seed=2, **SPEC))
    try:
        yield connector
    finally:
        connector.shutdown()


@pytest.fixture
def hung() -> Iterator[socket.socket]:
    """A side channel that accepts connections (the kernel's backlog) and never answers: a stopped prefill."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    try:
        yield sock
    finally:
        sock.close()


def _answer(prefill: ConnectorProcess, rid: str) -> PrefillAnswer:
    hold, params = prefill.call("request_finished", rid, PROMPT, RemoteDecodeRequest(do_remote_decode=True),
                                [[5, 6, 7, 2, 9]])
    assert hold is True and isinstance(params, PrefillAnswer)
    return params


@pytest.mark.slow  # a prefill process with a NIXL agent
def test_releases_to_a_hung_prefill_do_not_delay_a_load_from_a_healthy_one(
        prefill: ConnectorProcess, decode: DecodeSide, hung: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    healthy = _answer(prefill, "r-healthy")
    stuck = healthy.model_copy(update={"remote_host": "127.0.0.1", "remote_port": hung.getsockname()[1],
                                       "remote_engine_id": "engine-hung"})
    count = MAX_PENDING_RELEASES + 100  # past the cap: the last ones are dropped, and lines count them
    assert count * RELEASE_TIMEOUT_SECONDS / 4 > 3 * TRANSFER_S  # on the 4 loader threads, the load's deadline passed
    with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.decode.context"):
        for i in range(count):
            decode.release_unloaded(f"aborted-{i}", PROMPT,
                                    stuck.model_copy(update={"remote_request_id": f"held-{i}"}))
    assert decode.releases.pending <= MAX_PENDING_RELEASES and decode.releases.dropped > 0
    dropped = [r.getMessage() for r in caplog.records if "hold release not sent" in r.getMessage()]
    assert dropped and "(1 dropped so far)" in dropped[0], dropped
    assert "the prefill keeps the request's blocks until its hold's lease ends (kv_transfer.kv_lease_seconds)" \
        in dropped[0]

    d_ids = [[3, 4, 10, 11, 20]]
    external = decode.get_num_new_matched_tokens("r-healthy", PROMPT, healthy, 0)
    decode.start_load("r-healthy", PROMPT, healthy, d_ids, 0, external)
    ev = wait_events(decode.get_finished, lambda e: "r-healthy" in e.finished_recving | set(e.failed_recving),
                     timeout=3 * TRANSFER_S, what="the healthy load")
    assert "r-healthy" in ev.finished_recving, ev.failed_recving.get("r-healthy")
    prefill.wait_events(lambda e: "r-healthy" in e.finished_sending, what="the prefill freeing r-healthy")


def test_shutdown_drops_the_queued_releases_and_says_so(caplog: pytest.LogCaptureFixture) -> None:
    """At the connector's shutdown the release being sent finishes (within its own timeout); the queued ones are
    dropped, logged with their count (their leases free the blocks), and later ones are not taken."""
    releases = HoldReleases(threads=1, cap=10)
    sending, answer = threading.Event(), threading.Event()
    sent: list[str] = []

    def slow() -> None:
        sending.set()
        assert answer.wait(60.0), "the test never let the release answer"
        sent.append("slow")

    assert releases.submit("r-0", slow)
    assert sending.wait(60.0)
    for i in range(3):
        assert releases.submit(f"r-{i + 1}", lambda i=i: sent.append(f"queued-{i}"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.decode.context"):
        stopper = threading.Thread(target=releases.shutdown)
        stopper.start()
        deadline = time.monotonic() + 60.0
        while not releases.closed and time.monotonic() < deadline:
            time.sleep(0.01)
        answer.set()
        stopper.join(60.0)
    assert not stopper.is_alive() and sent == ["slow"]
    assert any(r.getMessage().startswith("3 hold release(s) not sent at shutdown") for r in caplog.records)
    assert not releases.submit("r-late", lambda: sent.append("late")) and sent == ["slow"]
