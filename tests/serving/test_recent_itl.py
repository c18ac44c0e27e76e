"""The instance's recent inter-token gap (server/recent_itl.py), /health's itl_ms, and how the proxy reads it."""

from __future__ import annotations

import pytest

from pdlaunch.proxy.instances import _health_body, _itl_ms
from pdlaunch.server.recent_itl import RecentItl


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_mean_gap_over_the_last_window_and_zero_when_idle() -> None:
    clock = Clock()
    itl = RecentItl(window_s=1.0, clock=clock)
    assert itl.ms() == 0.0
    itl.add(100.0, 0.010 * 4, 4)  # four streams, each 10 ms after its last token
    itl.add(100.5, 0.030, 1)  # one 30 ms gap
    assert itl.ms() == pytest.approx(14.0)  # (40 + 30) ms over 5 tokens
    clock.now = 101.2  # the first step left the window
    assert itl.ms() == pytest.approx(30.0)
    clock.now = 102.0
    assert itl.ms() == 0.0  # nothing streamed in the last second: idle


@pytest.mark.parametrize(("body", "expected"), [
    ({"status": "ok", "itl_ms": 8.5}, 8.5), ({"status": "ok", "itl_ms": 7}, 7.0), ({"itl_ms": 0}, 0.0),
    ({"status": "ok"}, None), ({"itl_ms": -1}, None), ({"itl_ms": True}, None), ({"itl_ms": "9"}, None),
    ({"itl_ms": float("inf")}, None),
])
def test_the_proxy_reads_itl_ms_and_ignores_what_is_not_a_gap(body: dict[str, object], expected: float | None) -> None:
    assert _itl_ms(body) == expected


def test_a_health_body_that_is_not_an_object_reads_as_empty() -> None:
    assert _health_body(b"ok") == {}
    assert _health_body(b"[1]") == {}
    assert _health_body(b'{"status": "ok"}') == {"status": "ok"}
