"""A stop signal stops the launcher whenever it lands, also inside the wait of its supervision loop.

The handler used to set a threading.Event that the main thread waits on: a signal that landed while the main thread
held that event's lock (between its wait's re-acquire and release) made set() wait for a lock its own thread held,
and `pdlaunch serve` hung for good on SIGTERM (CI, 2026-11-30; 118 of 200 signals into a `wait(0)` loop). The
children here loop on `wait(0)`, so nearly every signal lands in that window."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

from pdlaunch.signal_flag import SignalFlag

CHILDREN = 8  # with the old handler each one hung with probability ~0.6: all eight exiting by chance is ~1e-3
EXIT_TIMEOUT_S = 60.0

LOOP = textwrap.dedent("""
    from pdlaunch.launcher.serve import StopSignals

    with StopSignals() as signals:
        print("ready", flush=True)
        while not signals.requested.wait(0):
            pass
    print("stopped by", signals.signal_name, flush=True)
""")


def test_a_signal_landing_inside_the_supervision_wait_stops_the_loop() -> None:
    children = [subprocess.Popen([sys.executable, "-c", LOOP], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                                 text=True) for _ in range(CHILDREN)]
    try:
        for child in children:
            assert child.stdout is not None and child.stdout.readline() == "ready\n"
        for child in children:
            child.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + EXIT_TIMEOUT_S
        for child in children:
            out, _ = child.communicate(timeout=max(0.0, deadline - time.monotonic()))
            assert (child.returncode, out) == (0, "stopped by SIGTERM\n")
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait(10)


def test_wait_returns_at_once_when_set_and_after_its_timeout_when_not() -> None:
    flag = SignalFlag()
    started = time.monotonic()
    assert flag.wait(0.05) is False and time.monotonic() - started >= 0.05
    assert not flag.is_set()
    flag.set()
    assert flag.is_set() and flag.wait(3600) is True and flag.wait(0) is True
