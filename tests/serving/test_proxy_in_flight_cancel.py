"""A streamed leg whose instance answers an error: the instance's in-flight count (least-loaded routing reads it)
goes back even when the leg is cancelled while the error body is read (the client left) and again while the answer
is closed. The second cancellation skipped the decrement, and the instance looked busier than it was for good."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.upstream import Proxy

WAIT_S = 30.0


class HangingBody(httpx.AsyncByteStream):
    """An error answer whose body never comes and whose close waits: both are where a cancellation lands."""

    def __init__(self) -> None:
        self.reading, self.closing = asyncio.Event(), asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        self.reading.set()
        await asyncio.Event().wait()  # until cancelled
        yield b""

    async def aclose(self) -> None:
        self.closing.set()
        await asyncio.Event().wait()  # until cancelled


def test_a_second_cancel_while_an_error_answer_closes_still_ends_its_in_flight_count() -> None:
    async def run() -> int:
        body = HangingBody()
        instance = Instance("decode", "http://d0", "decode-0", state="ready")
        proxy = Proxy(InstancePool([instance]), request_timeout_s=60)
        transport = httpx.MockTransport(lambda request: httpx.Response(500, stream=body))
        async with httpx.AsyncClient(transport=transport) as proxy.client:
            deadline = asyncio.get_running_loop().time() + 60
            leg = asyncio.ensure_future(proxy.open_stream(instance, "/v1/completions", {"stream": True}, {}, deadline))
            await asyncio.wait_for(body.reading.wait(), WAIT_S)
            assert instance.in_flight == 1
            leg.cancel()  # the client left while the error body was read
            await asyncio.wait_for(body.closing.wait(), WAIT_S)
            leg.cancel()  # and the task is cancelled again while the answer closes
            with pytest.raises(asyncio.CancelledError):
                await leg
        return instance.in_flight

    assert asyncio.run(run()) == 0
