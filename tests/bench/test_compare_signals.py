"""`pdlaunch bench compare` under `nohup` (SIGHUP ignored) keeps running when the terminal closes; SIGTERM, and a
SIGHUP that is not ignored, unwind it like Ctrl-C so that its deployments are stopped."""

from __future__ import annotations

import os
import signal

import pytest

from pdlaunch.bench.compare import termination_as_interrupt


def test_an_ignored_hangup_stays_ignored_and_sigterm_still_interrupts() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGTERM"), termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)  # ignored: nothing raised
            os.kill(os.getpid(), signal.SIGTERM)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_IGN
    finally:
        signal.signal(signal.SIGHUP, previous)


def test_a_hangup_interrupts_when_not_ignored() -> None:
    previous = signal.signal(signal.SIGHUP, signal.SIG_DFL)
    try:
        with pytest.raises(KeyboardInterrupt, match="SIGHUP"), termination_as_interrupt():
            os.kill(os.getpid(), signal.SIGHUP)
        assert signal.getsignal(signal.SIGHUP) == signal.SIG_DFL
    finally:
        signal.signal(signal.SIGHUP, previous)
