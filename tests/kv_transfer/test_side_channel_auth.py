"""Issue 14's KV-read test: a peer without the deployment secret gets neither NIXL metadata nor data
from a prefill's side channel, and can neither hold (claim_read) nor free (cancel_push, release) its blocks;
a decode with the secret frees them with a release (a rank that has not shaken hands with the prefill).
Oversized frames, too many connections, replays and slow peers are refused; the server keeps serving."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator

import pytest

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.auth import SideChannelKeys
from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.params import RemoteDecodeRequest
from pdlaunch.kv_transfer.side_channel import client
from pdlaunch.kv_transfer.side_channel import server as side_channel_server
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec
from tests.kv_transfer.side_channel_client import authed, envelope, exchange, frame, read_answer
from tests.kv_transfer.test_nixl_local import _connector
from tests.serving.helpers import wait_for

WRONG = SideChannelKeys.from_secret("not-the-deployment-secret-0123")
HOLD = "req-held"


@pytest.fixture
def prefill() -> Iterator[NixlConnector]:
    connector = _connector("prefill", "auth-P", kv_lease_seconds=60.0)
    try:
        connector.register_kv_caches(make_spec())
        hold, _ = connector.request_finished(HOLD, list(range(9)),
                                             RemoteDecodeRequest(do_remote_decode=True), [[3, 4, 5]])
        assert hold
        yield connector
    finally:
        connector.shutdown()


def _hold(prefill: NixlConnector):  # the Hold of HOLD on the prefill side
    hold = prefill.sender.holds.get(HOLD)
    assert hold is not None
    return hold


def _no_metadata(answer: dict | None, prefill: NixlConnector) -> None:
    text = repr(answer)
    assert "agent_metadata" not in text and "base_addrs" not in text and prefill.agent.metadata().hex() not in text


def test_unauthenticated_peers_get_no_metadata_and_cannot_hold_or_free(prefill: NixlConnector,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    port = prefill.sender.server.port
    caplog.set_level(logging.WARNING)
    # The probe: a plain JSON frame as the old protocol took it.
    for attempt in (frame(b'{"type":"handshake"}', b""), frame(envelope({"type": "handshake", "engine_id": "auth-P"}),
                                                                b"\0" * 32)):
        answer = exchange(port, attempt)
        _no_metadata(answer, prefill)
        assert answer is None or answer["answer"]["ok"] is False
    # A made-up HMAC (another secret) for each message that reveals or changes something.
    for message in ({"type": "handshake", "engine_id": "auth-P"},
                    {"type": "claim_read", "request_id": HOLD, "seconds": 1e5, "reader": "auth-D", "load": "load-0"},
                    {"type": "cancel_push", "request_id": HOLD, "owner": "n"},
                    {"type": "release", "request_id": HOLD, "reader": "auth-D", "load": "load-0", "readers": 1,
                     "nonce": "n"},
                    {"type": "stage", "request_id": HOLD, "blocks": [[3, 4]], "reader": "auth-D", "load": "load-0",
                     "seconds": 1e5}):
        answer = exchange(port, authed(WRONG, message))
        assert answer is not None and answer["answer"] == {
            "ok": False, "error": "refused: the frame is not authenticated with this deployment's secret"}
        _no_metadata(answer, prefill)
    hold = _hold(prefill)
    assert not hold.read_claimed and not hold.cancelled and not hold.done
    assert hold.deadline - time.monotonic() < 61, "the lease must not have been extended"
    assert prefill.info()["held_requests"] == 1
    # The client library refuses an answer it cannot authenticate (a decode with the wrong secret).
    with pytest.raises(KVTransferError, match="not authenticated for this request"):
        client.call("127.0.0.1", port, {"type": "handshake", "engine_id": "auth-P"}, 5, "handshake", WRONG)
    assert "Traceback" not in caplog.text
    assert "KV side channel: refused" in caplog.text


def test_an_authenticated_release_frees_the_hold_as_the_release_notification_does(prefill: NixlConnector) -> None:
    """The prefill's side channel serves "release" (a decode rank without a handshake with this one sends it there):
    counted as that reader's release notification, so the hold ends at the next poll, long before its lease."""
    release = {"type": "release", "request_id": HOLD, "reader": "auth-D", "load": "load-0", "readers": 1,
               "nonce": "n-1"}
    assert client.call("127.0.0.1", prefill.sender.server.port, release, 5, "release", KEYS)["ok"]
    assert _hold(prefill).notified == {("auth-D", "load-0"): 1}
    wait_for(lambda: HOLD in prefill.get_finished().finished_sending, "the released hold freed")


def test_a_captured_frame_cannot_be_replayed(prefill: NixlConnector) -> None:
    port = prefill.sender.server.port
    captured = authed(KEYS, {"type": "handshake", "engine_id": "auth-P"})
    first = exchange(port, captured)
    assert first is not None and first["answer"]["ok"] and "agent_metadata" in first["answer"]["info"]
    replay = exchange(port, captured)
    assert replay is not None and "refused: the frame was seen before" in replay["answer"]["error"]
    old = exchange(port, authed(KEYS, {"type": "handshake", "engine_id": "auth-P"}, ts=time.time() - 600))
    assert old is not None and "behind this host's clock" in old["answer"]["error"]


def test_claims_are_bounded_by_the_lease(prefill: NixlConnector) -> None:
    port = prefill.sender.server.port
    for seconds, why in ((1e308, "less than or equal"), (-1.0, "greater than or equal"), (float("nan"), "finite")):
        body = envelope({"type": "claim_read", "request_id": HOLD, "seconds": seconds, "reader": "auth-D",
                         "load": "load-0"})
        from pdlaunch.kv_transfer.auth import mac
        answer = exchange(port, frame(body, mac(KEYS.request, body)))
        assert answer is not None and not answer["answer"]["ok"]
        assert "msg.claim_read.seconds" in answer["answer"]["error"] and why in answer["answer"]["error"]
    assert not _hold(prefill).read_claimed
    claim = {"type": "claim_read", "request_id": HOLD, "seconds": 3000.0, "reader": "auth-D", "load": "load-0"}
    client.call("127.0.0.1", port, claim, 5, "claim", KEYS)
    hold = _hold(prefill)
    assert hold.read_claimed and hold.deadline - time.monotonic() <= 60.0 + 5.0 + 1.0  # lease + READ grace


def test_oversized_frames_and_too_many_connections_are_refused(prefill: NixlConnector) -> None:
    port = prefill.sender.server.port
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall((64 << 20).to_bytes(4, "big"))  # announces 64 MiB: refused before anything is read
        answer = read_answer(sock)
        assert answer is not None and "the side channel takes 32 to 1048576" in answer["answer"]["error"]
    server = prefill.sender.server
    held: list[socket.socket] = []
    try:
        for _ in range(server.max_connections):  # slow peers that send nothing
            held.append(socket.create_connection(("127.0.0.1", port), timeout=15))
        deadline = time.monotonic() + 30
        while server.num_connections() < server.max_connections and time.monotonic() < deadline:
            time.sleep(0.02)
        assert server.num_connections() == server.max_connections
        with pytest.raises(KVTransferError, match="too many side-channel connections"):
            client.call("127.0.0.1", port, {"type": "handshake", "engine_id": "auth-P"}, 5, "handshake", KEYS)
    finally:
        for sock in held:
            sock.close()
    deadline = time.monotonic() + 10
    while server.num_connections() and time.monotonic() < deadline:
        time.sleep(0.02)
    answer = client.call("127.0.0.1", port, {"type": "handshake", "engine_id": "auth-P"}, 5, "handshake", KEYS)
    assert answer["info"]["engine_id"] == "auth-P"


def test_a_slow_loris_is_dropped_within_the_frame_timeout(prefill: NixlConnector, monkeypatch) -> None:
    monkeypatch.setattr(side_channel_server, "FRAME_READ_SECONDS", 0.5)
    with socket.create_connection(("127.0.0.1", prefill.sender.server.port), timeout=15) as sock:
        sock.sendall(b"\0\0")  # half a header, then nothing
        started = time.monotonic()
        answer = read_answer(sock)
        assert time.monotonic() - started < 5
        assert answer is not None and "not received within" in answer["answer"]["error"]
    threading.Event().wait(0.1)
    assert prefill.sender.server.num_connections() == 0


@pytest.mark.skipif(shutil.which("ss") is None, reason="needs `ss` to list listening sockets")
def test_ucx_listens_on_loopback_only_on_one_host(prefill: NixlConnector) -> None:
    """The issue saw UCX listen on the host's external address too; a one-host deployment (side channel
    on 127.0.0.1) keeps every listening socket of this process on loopback."""
    assert os.environ.get("UCX_NET_DEVICES") == "lo"
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, timeout=30).stdout
    mine = [line.split()[3] for line in out.splitlines() if f"pid={os.getpid()}," in line]
    assert mine, "this process listens somewhere (side channel, UCX)"
    assert all(addr.rsplit(":", 1)[0] in ("127.0.0.1", "[::1]", "[::ffff:127.0.0.1]") for addr in mine), mine


def test_a_decode_closing_a_claim_it_no_longer_reads_is_not_a_refused_peer(prefill: NixlConnector,
                                                                           caplog: pytest.LogCaptureFixture) -> None:
    # A decode whose load was aborted while its claim travelled closes the connection unread: a reset, not an attack.
    caplog.set_level(logging.DEBUG, logger="pdlaunch.kv_transfer.side_channel.server")
    claim = {"type": "claim_read", "request_id": HOLD, "seconds": 1.0, "reader": "auth-D", "load": "load-0"}
    sock = socket.create_connection(("127.0.0.1", prefill.sender.server.port), timeout=15)
    sock.sendall(authed(KEYS, claim))
    wait_for(lambda: _hold(prefill).read_claimed, "the claim to be served", 30)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close with a reset
    sock.close()
    wait_for(lambda: prefill.sender.server.num_connections() == 0, "the server to drop the reset connection", 30)
    assert "refused" not in caplog.text, caplog.text
    assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
