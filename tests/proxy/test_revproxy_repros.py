"""Repros of proxy bugs found by review (h-revproxy). Each test states what the proxy should do; each fails today
(xfail strict: the fix turns it into an XPASS, which fails until the mark is removed)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.migrate import Migrations
from pdlaunch.proxy.upstream import Proxy


def _two_decodes() -> tuple[InstancePool, Instance, Instance]:
    first, second = Instance("decode", "http://127.0.0.1:9", "decode-0"), Instance("decode", "http://127.0.0.1:9",
                                                                                    "decode-1")
    pool = InstancePool([first, second])
    first.state = second.state = "ready"
    return pool, first, second


@pytest.mark.xfail(strict=True, reason="migrate.open_stream/answer call another() after an await without others()")
def test_a_stall_whose_other_decode_went_down_meanwhile_is_no_500() -> None:
    """Migrations.open_stream (and .answer) take Stalled as proof another decode is ready and call another() at once;
    but unless_stalled checked others() before awaiting the cancelled leg's end, and the health monitor may mark that
    other decode down meanwhile: another() then asks the policy to choose among none (RoundRobin: ZeroDivisionError;
    LeastLoaded: ValueError from min()): a 500 with a traceback, not the stalled decode's wait or a 502/503."""
    async def scenario() -> Any:
        pool, first, second = _two_decodes()
        proxy = Proxy(pool, 30.0)

        async def open_stream(instance: Instance, path: str, body: Any, headers: Any, deadline: float) -> Any:
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                pool.mark_down(second, "health check failed: ConnectError")  # the monitor, during the unwinding
                await asyncio.sleep(0)
                raise

        proxy.open_stream = open_stream  # type: ignore[method-assign]
        migrations = Migrations(proxy, 3)
        asyncio.get_running_loop().call_later(0.05, first.stalled.set)
        try:
            await migrations.open_stream(first, "/v1/completions", {"prompt": "x"}, {"prompt": "x"}, {},
                                         asyncio.get_running_loop().time() + 30, "r", lambda: None)
        except (ZeroDivisionError, ValueError) as exc:
            return exc
        except Exception as exc:  # noqa: BLE001 - any OpenAIError is a fine answer here
            return exc
        return None

    outcome = asyncio.run(scenario())
    assert not isinstance(outcome, (ZeroDivisionError, ValueError)), repr(outcome)
