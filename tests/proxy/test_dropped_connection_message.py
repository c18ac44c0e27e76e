"""A client whose request was on an instance that died reads what happened and what to do: httpx's ReadError from
a killed peer has no text, and the 502 read `decode-0 (...) failed mid-request: ReadError: `."""

from __future__ import annotations

import httpx

from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.translate import DroppedConnection, error_from_exception, exception_text

DECODE = Instance(role="decode", url="http://127.0.0.1:9000", name="decode-0", state="ready")


def test_a_killed_instance_is_named_with_what_to_do() -> None:
    err = error_from_exception(DECODE, httpx.ReadError(""), 30)
    assert isinstance(err, DroppedConnection) and (err.status, err.code) == (502, "instance_failed")
    assert err.message.startswith("decode-0 (http://127.0.0.1:9000) closed the connection mid-request (ReadError)")
    assert "retry" in err.message and "GET /instances" in err.message
    assert not err.message.rstrip().endswith(":")


def test_an_exception_with_text_keeps_it() -> None:
    err = error_from_exception(DECODE, httpx.RemoteProtocolError("Server disconnected"), 30)
    assert "(RemoteProtocolError: Server disconnected)" in err.message
    other = error_from_exception(DECODE, httpx.DecodingError(""), 30)
    assert other.message == "decode-0 (http://127.0.0.1:9000) failed mid-request: DecodingError"


def test_exception_text() -> None:
    assert exception_text(httpx.ReadError("")) == "ReadError"
    assert exception_text(httpx.ReadError("  ")) == "ReadError"
    assert exception_text(ValueError("bad")) == "ValueError: bad"
