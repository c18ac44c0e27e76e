"""`pdlaunch serve` started under `nohup` (SIGHUP ignored) keeps serving when the terminal closes: the
launcher's stop signals leave an ignored SIGHUP ignored, while SIGINT/SIGTERM/SIGHUP otherwise stop it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest

from pdlaunch.launcher.serve import StopSignals


@pytest.fixture()
def sighup_ignored() -> Iterator[None]:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_that_nohup_ignores_does_not_stop_the_deployment(sighup_ignored: None) -> None:
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGHUP)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered (and handled) in order, after the SIGHUP
        assert signals.requested.is_set() and signals.signal_name == "SIGTERM" and not signals.forced
    assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN


def test_a_hangup_stops_the_deployment_when_not_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with StopSignals() as signals:
            os.kill(os.getpid(), signal.SIGHUP)
            assert signals.requested.is_set() and signals.signal_name == "SIGHUP"
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
