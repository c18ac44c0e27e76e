"""A stop signal (Ctrl-C, SIGTERM) that reaches `pdlaunch check-config` once the check is done, while it prints its
report or right after its verdict line, leaves the verdict's exit status (0 valid, 1 invalid): the check finished.
Only a stop during the check itself is exit 130 (tests/launcher/test_stop_while_loading.py). The signal is sent to
this process where the verdict has just been printed, and the test waits until its handler has run."""

from __future__ import annotations

import os
import signal
import threading
import time
from types import FrameType
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from pdlaunch import cli
from pdlaunch.config import check

SIGNAL_WAIT_S = 30.0
VALID = ["--model", "tiny", "--device", "cpu", "--colocated"]
INVALID = ["--model", "tiny", "--device", "cpu", "--prefill", "-1"]


def _signal_self(sig: signal.Signals) -> None:
    """Send `sig` to this process and return once the handler in force has run (unless it raises)."""
    handler = signal.getsignal(sig)
    assert callable(handler), handler  # check-config's own, installed while it runs
    ran = threading.Event()

    def noting(signum: int, frame: FrameType | None) -> None:
        ran.set()
        handler(signum, frame)

    signal.signal(sig, noting)
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while not ran.is_set():  # Python runs the handler between these sleeps
        assert time.monotonic() < deadline, f"{sig.name} was not handled within {SIGNAL_WAIT_S:.0f}s"
        time.sleep(0.01)
    signal.signal(sig, handler)


def _is_verdict(objects: tuple[Any, ...]) -> bool:
    return bool(objects) and isinstance(objects[0], Text) and (
        objects[0].plain == "valid" or objects[0].plain.startswith("invalid: "))


@pytest.mark.parametrize(("args", "verdict", "code"), [(VALID, "valid", 0), (INVALID, "invalid: 1 problem(s)", 1)],
                         ids=["valid", "invalid"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_right_after_the_verdict_line_keeps_its_status(monkeypatch: pytest.MonkeyPatch, sig: signal.Signals,
                                                              args: list[str], verdict: str, code: int) -> None:
    class StoppedAfterTheVerdict(Console):
        def print(self, *objects: Any, **kwargs: Any) -> None:
            super().print(*objects, **kwargs)
            if _is_verdict(objects):
                _signal_self(sig)

    monkeypatch.setattr(check, "Console", StoppedAfterTheVerdict)
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli.app, ["check-config", *args], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert result.output.rstrip().endswith(verdict), result.output
    assert "received while loading the deployment" not in result.output
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back


@pytest.mark.parametrize(("args", "code"), [(VALID, 0), (INVALID, 1)], ids=["valid", "invalid"])
def test_a_stop_right_after_the_json_report_keeps_its_status(monkeypatch: pytest.MonkeyPatch, args: list[str],
                                                             code: int) -> None:
    def print_then_stop(*objects: Any, **kwargs: Any) -> None:
        print(*objects, **kwargs)
        _signal_self(signal.SIGINT)

    monkeypatch.setattr(check, "print", print_then_stop, raising=False)  # the JSON report's print
    result = CliRunner().invoke(cli.app, ["check-config", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == code, result.output
    assert f'"valid": {"true" if code == 0 else "false"}' in result.output
    assert "received while loading the deployment" not in result.output
