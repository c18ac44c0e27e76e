"""A hypothesis fuzz test of the side-channel protocol: random bytes, random frames, and random field
values in authenticated and unauthenticated messages. Afterwards: the server thread lives, no traceback
was logged, a valid authenticated handshake is answered, and no blocks are held."""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pdlaunch.kv_transfer.nixl_connector import NixlConnector
from pdlaunch.kv_transfer.side_channel import client
from tests.kv_transfer.deployment_secret import KEYS
from tests.kv_transfer.pd_procs import make_spec
from tests.kv_transfer.side_channel_client import authed, frame, read_answer
from tests.kv_transfer.test_nixl_local import _connector

TYPES = ["handshake", "push", "stage", "unstage", "claim_read", "cancel_push", "release", "forget", "listen",
         "held_blocks", "drop_held", "nope", ""]
FIELDS = ["engine_id", "request_id", "nonce", "owner", "last", "agent_name", "agent_metadata", "runs", "base_addrs",
          "block_bytes", "device_id", "deadline_in", "blocks", "ticket", "seconds", "reader", "readers",
          "client_request_id", "prompt_digest", "wait", "extra"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([1e308, -1.0, 0.0, 3.0]),
    st.text(max_size=40), st.sampled_from(["00", "zz", "ab" * 10, "req-held", "fuzz-P"]),
)
values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                                          max_size=3), max_leaves=12)
messages = st.builds(lambda t, fields: {"type": t, **fields}, st.sampled_from(TYPES),
                     st.dictionaries(st.sampled_from(FIELDS), values, max_size=6))
FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture(scope="module")
def records() -> Iterator[_Records]:
    """Every pdlaunch log record of the whole module (caplog covers one test only)."""
    handler, logger = _Records(), logging.getLogger("pdlaunch")
    level, logger.level = logger.level, logging.DEBUG
    logger.addHandler(handler)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(level)


@pytest.fixture(scope="module")
def prefill(records: _Records) -> Iterator[NixlConnector]:
    connector = _connector("prefill", "fuzz-P", kv_lease_seconds=60.0)
    try:
        connector.register_kv_caches(make_spec())
        yield connector
    finally:
        connector.shutdown()


def _send(port: int, data: bytes) -> dict[str, Any] | None:
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)  # a truncated frame ends here instead of waiting for the timeout
        except OSError:  # the server refused and closed first
            return None
        return read_answer(sock)


@FUZZ
@given(data=st.binary(max_size=300))
def test_random_bytes(prefill: NixlConnector, data: bytes) -> None:
    answer = _send(prefill.sender.server.port, data)
    assert answer is None or answer["answer"]["ok"] is False


@FUZZ
@given(body=st.binary(max_size=200), tag=st.binary(min_size=32, max_size=32), length=st.integers(0, 2**32 - 1))
def test_random_frames(prefill: NixlConnector, body: bytes, tag: bytes, length: int) -> None:
    for data in (frame(body, tag), struct.pack(">I", length) + tag + body):
        answer = _send(prefill.sender.server.port, data)
        assert answer is None or answer["answer"]["ok"] is False


@FUZZ
@given(message=messages | values, ts=st.one_of(st.none(), st.floats()))
def test_authenticated_random_messages(prefill: NixlConnector, message: Any, ts: float | None) -> None:
    try:
        data = authed(KEYS, message, ts=ts)
    except ValueError:  # NaN/inf do not encode as strict JSON... python's json writes them: still sent
        return
    answer = _send(prefill.sender.server.port, data)
    assert answer is not None and isinstance(answer["answer"]["ok"], bool)


@FUZZ
@given(message=messages)
def test_unauthenticated_messages(prefill: NixlConnector, message: Any) -> None:
    answer = _send(prefill.sender.server.port, authed(side_channel_wrong_keys(), message))
    assert answer is not None and answer["answer"]["ok"] is False and "info" not in answer["answer"]


def side_channel_wrong_keys():  # type: ignore[no-untyped-def]
    from pdlaunch.kv_transfer.auth import SideChannelKeys

    return SideChannelKeys.from_secret("fuzzing-without-the-secret-0123")


def test_after_fuzzing_the_server_serves_and_holds_nothing(prefill: NixlConnector, records: _Records) -> None:
    """Runs last in this module (pytest keeps file order): one more round of every kind, then the checks
    over everything the module logged."""
    port = prefill.sender.server.port
    for data in (b"\0\0\0\5hello", frame(b"{}", b"\1" * 32), authed(KEYS, {"type": "push"}),
                 authed(KEYS, {"type": "claim_read", "request_id": "x", "seconds": float("nan")}),
                 authed(KEYS, {"type": "listen", "agent_name": "a", "agent_metadata": "00ff", "reader": "d"})):
        _send(port, data)
    assert prefill.sender.server._thread.is_alive()
    assert records.records, "the refusals are logged (rate-limited)"
    assert not [r for r in records.records if r.exc_info or "Traceback" in r.getMessage()]
    answer = client.call("127.0.0.1", port, {"type": "handshake", "engine_id": "fuzz-P"}, 10, "handshake", KEYS)
    assert answer["info"]["engine_id"] == "fuzz-P"
    assert prefill.info()["held_requests"] == 0
    assert prefill.sender.staging_users() == set()
