"""DisconnectWatch (http/disconnect.py): the one race between a handler's wait and the client leaving,
used by the instance server, its multi-choice path and the proxy."""

from __future__ import annotations

import asyncio

import pytest
from starlette.requests import Request
from starlette.types import Message

from pdlaunch.http.disconnect import ClientDisconnected, DisconnectWatch


class Connection:
    """A request whose body is read; `leave()` makes the client close the connection."""

    def __init__(self) -> None:
        self.left = asyncio.Event()

    async def receive(self) -> Message:
        await self.left.wait()
        return {"type": "http.disconnect"}

    def request(self) -> Request:
        return Request({"type": "http", "method": "POST", "path": "/", "headers": []}, self.receive)

    def leave(self) -> None:
        self.left.set()


class Work:
    """Waits until released (or cancelled); records how it ended."""

    def __init__(self) -> None:
        self.release = asyncio.Event()
        self.ended = ""

    async def __call__(self) -> str:
        try:
            await self.release.wait()
            self.ended = "finished"
            return "answer"
        except asyncio.CancelledError:
            self.ended = "cancelled"
            raise


def test_result_of_work_that_finishes_first() -> None:
    async def main() -> None:
        connection, work = Connection(), Work()
        with DisconnectWatch(connection.request()) as watch:
            work.release.set()
            assert await watch.run(work()) == "answer"
            assert not watch.gone

    asyncio.run(main())


def test_client_leaving_first_cancels_the_work_and_raises() -> None:
    async def main() -> None:
        connection, work = Connection(), Work()
        with DisconnectWatch(connection.request()) as watch:
            asyncio.get_running_loop().call_later(0.05, connection.leave)
            with pytest.raises(ClientDisconnected):
                await asyncio.wait_for(watch.run(work()), 5)
            assert work.ended == "cancelled"  # ended before run() returned, not merely asked to
            assert watch.gone

    asyncio.run(main())


def test_an_error_of_the_work_propagates() -> None:
    async def fails() -> None:
        raise ValueError("engine failed")

    async def main() -> None:
        with DisconnectWatch(Connection().request()) as watch:
            with pytest.raises(ValueError, match="engine failed"):
                await watch.run(fails())

    asyncio.run(main())


def test_cancelling_the_caller_cancels_the_work() -> None:
    async def main() -> None:
        work = Work()
        with DisconnectWatch(Connection().request()) as watch:
            caller = asyncio.ensure_future(watch.run(work()))
            await asyncio.sleep(0.05)
            caller.cancel()
            with pytest.raises(asyncio.CancelledError):
                await caller
            await asyncio.sleep(0)  # the work's cancellation is delivered on its next step
            assert work.ended == "cancelled"

    asyncio.run(main())


def test_a_closed_watch_is_not_a_disconnect() -> None:
    async def main() -> None:
        watch = DisconnectWatch(Connection().request())
        watch.close()
        await asyncio.sleep(0)
        assert not watch.gone

    asyncio.run(main())


class Opened:
    """What a wait may return that holds something until closed (an upstream stream)."""

    def __init__(self) -> None:
        self.closed = False

    async def close(self) -> None:
        self.closed = True


def test_a_result_that_arrives_as_the_caller_is_cancelled_is_discarded() -> None:
    """The work returns an open stream in the same turn of the loop as its caller is cancelled (another prompt
    of the request failed, the request's task ended): nobody reads it, so `discard` closes it (before, it stayed
    open, holding its instance's in-flight count and its request for good)."""

    async def scenario() -> Opened:
        connection, gate, opened = Connection(), asyncio.Event(), Opened()

        async def work() -> Opened:
            await gate.wait()
            return opened

        with DisconnectWatch(connection.request()) as watch:
            runner = asyncio.ensure_future(watch.run(work(), discard=Opened.close))
            for _ in range(3):
                await asyncio.sleep(0)  # the runner waits on the work and the connection
            gate.set()  # the work ends on the loop's next turn ...
            runner.cancel()  # ... the turn that delivers the cancellation
            with pytest.raises(asyncio.CancelledError):
                await runner
        return opened

    assert asyncio.run(scenario()).closed
