"""A decode leg given up because its decode was marked stalled (leg_failure.unless_stalled) while its stream's headers
came in all the same: the stream that opened is closed, its in-flight count ended. Python 3.11's asyncio.wait_for
(Proxy.open_stream awaits client.send through it) returns the inner result, rather than raising, when it is cancelled
after that result came; the stall branch dropped that open stream unclosed, so its decode's in-flight count stayed +1
for good (least_loaded avoided it; disaggregate_max_itl_ms took an idle decode for a busy one) and the decode's response
stayed open."""

from __future__ import annotations

import asyncio

import pytest

from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.leg_failure import Stalled, unless_stalled
from pdlaunch.proxy.load_board import IN_FLIGHT


def test_a_stream_opened_as_its_decode_is_marked_stalled_is_closed() -> None:
    async def scenario() -> tuple[int, list[str]]:
        first, second = Instance("decode", "http://127.0.0.1:9", "decode-0"), Instance("decode", "http://127.0.0.1:9",
                                                                                        "decode-1")
        pool = InstancePool([first, second])
        first.state = second.state = "ready"
        closed: list[str] = []
        headers = asyncio.get_running_loop().create_future()

        class Opened:
            async def close(self) -> None:
                first.count(IN_FLIGHT, -1)
                closed.append("closed")

        async def open_stream() -> Opened:  # as Proxy.open_stream: counts, then awaits the headers via wait_for
            first.count(IN_FLIGHT, 1)
            try:
                await asyncio.wait_for(headers, 30)  # 3.11: returns the result when cancelled after it came
            except asyncio.CancelledError:
                first.count(IN_FLIGHT, -1)
                raise
            return Opened()

        async def discard(opened: Opened) -> None:
            await opened.close()

        def stall_then_headers() -> None:  # the headers come one loop iteration after the probe marks it stalled
            first.stalled.set()
            asyncio.get_running_loop().call_soon(headers.set_result, None)

        asyncio.get_running_loop().call_later(0.05, stall_then_headers)
        with pytest.raises(Stalled):
            await unless_stalled(pool, first, open_stream(), discard=discard)
        return first.in_flight, closed

    in_flight, closed = asyncio.run(scenario())
    assert in_flight == 0 and closed == ["closed"], (in_flight, closed)
