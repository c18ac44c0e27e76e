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
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.kv_transfer_config import KVTransferConfig
from pdlaunch.kv_transfer.decode.context import (
    MAX_PENDING_RELEASES,
    RELEASE_TIMEOUT_SECONDS,
    SHUTDOWN_DRAIN_SECONDS,
    HoldReleases,
    LoadContext,
)
from pdlaunch.kv_transfer.decode.load import Load, LoadState
from pdlaunch.kv_transfer.decode.push import PushLoad
from pdlaunch.kv_transfer.decode.side import DecodeSide
from pdlaunch.kv_transfer.decode.table import LoadTable
from pdlaunch.kv_transfer.factory import create_connector
from pdlaunch.kv_transfer.params import PrefillAnswer, RemoteDecodeRequest
from pdlaunch.kv_transfer.remote_kv import RemoteKV
from tests.kv_transfer.deployment_secret import KEYS, secured
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


def _running_push(ctx: LoadContext, i: int, hung: socket.socket, push_sent: bool) -> Load:
    """Load r-i, a running push from prefill P (its side channel: the hung socket), sent or not yet."""
    now = time.monotonic()
    load = Load(f"r-{i}", RemoteKV(engine_id="P", request_id=f"p-{i}", host="127.0.0.1",
                                   port=hung.getsockname()[1], block_ids=[[3]]),
                [[(0, 3, 1)]], deadline=now + 60.0, started=now, state=LoadState.RUNNING)
    load.strategy, load.push_sent = PushLoad(ctx), push_sent
    return load


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


def _shutdown_while_queued(releases: HoldReleases, answer: threading.Event) -> float:
    """Shut `releases` down on a thread of its own while its one thread is busy and the rest wait queued, let the
    busy release answer once the shutdown stopped taking releases; the shutdown's seconds."""
    started = time.monotonic()
    stopper = threading.Thread(target=releases.shutdown)
    stopper.start()
    deadline = time.monotonic() + 60.0
    while not releases.stopping and time.monotonic() < deadline:
        time.sleep(0.01)
    answer.set()
    stopper.join(60.0)
    assert not stopper.is_alive(), "the shutdown did not return"
    return time.monotonic() - started


def test_shutdown_sends_the_queued_releases_to_a_healthy_prefill(caplog: pytest.LogCaptureFixture) -> None:
    """At the connector's shutdown the queued releases (among them those its aborted loads queue as they leave their
    handshake) are still sent: a prefill that answers frees the blocks now, not at its hold's lease. They used to be
    dropped; before the release threads, they ran, and were sent, on the loader threads the shutdown waits for."""
    releases = HoldReleases(threads=1, cap=100)
    sending, answer = threading.Event(), threading.Event()
    sent: list[str] = []

    def first() -> None:
        sending.set()
        assert answer.wait(60.0), "the test never let the release answer"
        sent.append("first")

    assert releases.submit("r-0", first)
    assert sending.wait(60.0)
    for i in range(20):
        assert releases.submit(f"r-{i + 1}", lambda i=i: sent.append(f"queued-{i}"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.decode.context"):
        _shutdown_while_queued(releases, answer)
    assert sent == ["first"] + [f"queued-{i}" for i in range(20)]
    assert not any("not sent at shutdown" in r.getMessage() for r in caplog.records)
    assert not releases.submit("r-late", lambda: sent.append("late")) and sent[-1] == "queued-19"


def test_shutdown_gives_a_hung_prefill_a_bounded_drain_then_drops_and_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """Releases to a prefill that does not answer (each send waits RELEASE_TIMEOUT_SECONDS, as the side channel's):
    the shutdown sends the queued ones for SHUTDOWN_DRAIN_SECONDS in all, not one timeout each, then drops the rest,
    logged with their count (their leases free the blocks), and takes no later ones."""
    releases = HoldReleases(threads=1, cap=100)
    never = threading.Event()
    tried: list[str] = []

    def hung(rid: str) -> None:
        tried.append(rid)
        never.wait(RELEASE_TIMEOUT_SECONDS)  # the side channel's timeout: no answer

    count = 20
    assert count * RELEASE_TIMEOUT_SECONDS > 3 * (SHUTDOWN_DRAIN_SECONDS + RELEASE_TIMEOUT_SECONDS)
    for i in range(count):
        assert releases.submit(f"r-{i}", lambda i=i: hung(f"r-{i}"))  # type: ignore[misc]
    with caplog.at_level(logging.INFO, logger="pdlaunch.kv_transfer.decode.context"):
        seconds = _shutdown_while_queued(releases, threading.Event())
    # Generous: one drain, then the release being sent ends within its own timeout.
    assert seconds < 3 * (SHUTDOWN_DRAIN_SECONDS + RELEASE_TIMEOUT_SECONDS), seconds
    lines = [r.getMessage() for r in caplog.records if "not sent at shutdown" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith(f"{count - len(tried)} hold release(s) not sent"), (lines, tried)
    assert len(tried) < count
    assert not releases.submit("r-late", lambda: tried.append("late")) and "late" not in tried


@pytest.mark.slow  # a prefill process with a NIXL agent
def test_loads_aborted_before_their_handshake_release_off_the_loader_threads(
        prefill: ConnectorProcess, decode: DecodeSide, hung: socket.socket) -> None:
    """Loads from a hung prefill aborted before their handshake ended: each loader gives up the handshake, and the
    load's hold release ("cancel_push", DecodeLoads.drop_unstarted) goes to the release threads, never waited for on
    the loader thread; a load from a healthy prefill, started right after, completes within its deadline. On the
    loader threads, the releases (each waits RELEASE_TIMEOUT_SECONDS on the hung prefill) kept them past it."""
    healthy = _answer(prefill, "r-healthy")
    stuck = healthy.model_copy(update={"remote_host": "127.0.0.1", "remote_port": hung.getsockname()[1],
                                       "remote_engine_id": "engine-hung"})
    count = 40
    workers = decode.ctx.executor._max_workers  # noqa: SLF001 - the loader threads' count
    assert count * RELEASE_TIMEOUT_SECONDS / workers > 3 * TRANSFER_S
    d_ids = [[3, 4, 10, 11, 20]]
    external = decode.get_num_new_matched_tokens("r-healthy", PROMPT, healthy, 0)
    for i in range(count):
        params = stuck.model_copy(update={"remote_request_id": f"held-{i}"})
        decode.start_load(f"aborted-{i}", PROMPT, params, d_ids, 0, external)
        assert decode.abort_load(f"aborted-{i}") is False  # nothing was asked of the prefill: no drain
    decode.start_load("r-healthy", PROMPT, healthy, d_ids, 0, external)  # queued behind the aborted loads
    ev = wait_events(decode.get_finished, lambda e: "r-healthy" in e.finished_recving | set(e.failed_recving),
                     timeout=3 * TRANSFER_S, what="the healthy load")
    assert "r-healthy" in ev.finished_recving, ev.failed_recving.get("r-healthy")
    prefill.wait_events(lambda e: "r-healthy" in e.finished_sending, what="the prefill freeing r-healthy")
    assert decode.releases.pending > 0  # the hung prefill's releases still wait, on their own threads


@pytest.mark.parametrize("push_sent", [True, False], ids=["draining", "unsent"])
def test_push_cancels_to_a_hung_prefill_leave_the_loader_threads_free(hung: socket.socket, push_sent: bool) -> None:
    """Aborted push loads tell their prefill "cancel_push": one whose push request went out drains until the answer
    (LoadTable._start_drain), one whose request did not (cancel_unsent). Against a prefill that does not answer, the
    cancels wait on the release threads; the loader thread is free at once for the next load. They used to run on
    the loader threads, each up to the handshake timeout (here 60 s)."""
    agent = SimpleNamespace(release_wait_seconds=0.0, release_wait_seconds_per_byte=0.0, release_cancels=True)
    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        ctx = LoadContext(agent=cast(Any, agent), spec=cast(Any, None), peers=cast(Any, None), keys=KEYS,
                          handshake_timeout=60.0, transfer_timeout=60.0, verify_kv=False, executor=executor,
                          reader="decode")
        stack.callback(ctx.connections.close)
        stack.callback(ctx.releases.shutdown)
        table = LoadTable(ctx)
        for i in range(4):
            load = _running_push(ctx, i, hung, push_sent)
            table.add(load)
            assert table.abort(load.request_id) is push_sent  # sent: a WRITE may land, the blocks drain
        next_load = executor.submit(lambda: None)
        next_load.result(timeout=RELEASE_TIMEOUT_SECONDS)  # TimeoutError: the loader thread waits on a cancel
        assert ctx.releases.pending == 4  # the cancels wait for the hung prefill on their own threads


@pytest.mark.parametrize("push_sent", [True, False], ids=["draining", "unsent"])
def test_a_dropped_push_cancel_names_what_it_costs(hung: socket.socket, push_sent: bool,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """Past the cap, a dropped cancel of a push that went out costs this decode's blocks (they drain until
    drain_until), not the prefill's: its line says so. One of a push never sent is a hold release by its cost (the
    prefill keeps the blocks until its hold's lease ends). Both used to read as a hold release."""
    agent = SimpleNamespace(release_wait_seconds=0.0, release_wait_seconds_per_byte=0.0, release_cancels=True)
    with ExitStack() as stack:
        executor = stack.enter_context(ThreadPoolExecutor(max_workers=1))
        ctx = LoadContext(agent=cast(Any, agent), spec=cast(Any, None), peers=cast(Any, None), keys=KEYS,
                          handshake_timeout=60.0, transfer_timeout=60.0, verify_kv=False, executor=executor,
                          reader="decode", releases=HoldReleases(threads=1, cap=1))
        stack.callback(ctx.connections.close)
        stack.callback(ctx.releases.shutdown)
        table = LoadTable(ctx)
        with caplog.at_level(logging.WARNING, logger="pdlaunch.kv_transfer.decode.context"):
            for i in range(2):  # the second is past the cap: the first waits for the hung prefill
                load = _running_push(ctx, i, hung, push_sent)
                table.add(load)
                table.abort(load.request_id)
        lines = [r.getMessage() for r in caplog.records if "not sent:" in r.getMessage()]
        assert len(lines) == 1 and lines[0].startswith("request r-1: "), lines
        if push_sent:
            assert "push cancel not sent" in lines[0] and "this decode's blocks the push writes stay draining" \
                in lines[0], lines
            assert "hold's lease" not in lines[0], lines
        else:
            assert "hold release not sent" in lines[0] and "the prefill keeps the request's blocks until its " \
                "hold's lease ends (kv_transfer.kv_lease_seconds)" in lines[0], lines
