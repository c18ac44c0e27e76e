"""Ctrl-C or SIGTERM while `pdlaunch serve` loads and checks the deployment (reading the checkpoint, asking a
cluster for its nodes) stops it with one line and exit 0, as a stop later on does: nothing was started yet, and the
user sees no traceback. `pdlaunch check-config` stopped so has no verdict: the same line, exit 130."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pdlaunch import cli
from pdlaunch.config import check, loader

SIGNAL_WAIT_S = 30.0


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_while_loading_exits_0_with_one_line(sig: signal.Signals, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loader, "load_valid_deployment", lambda *args: _signalled(sig))
    before = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    result = CliRunner().invoke(cli.app, ["serve", "--model", "tiny", "--device", "cpu", "--colocated",
                                          "--log-dir", str(tmp_path / "logs")], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"{sig.name} received while loading the deployment; stopping (nothing was started)" in result.output
    assert "Traceback" not in result.output
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before  # given back


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_during_check_config_exits_130_with_one_line(sig: signal.Signals,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(check, "check_report", lambda *args: _signalled(sig))
    result = CliRunner().invoke(cli.app, ["check-config", "--model", "tiny", "--device", "cpu", "--colocated"],
                                catch_exceptions=False)
    assert result.exit_code == 130, result.output
    assert f"{sig.name} received while loading the deployment; stopping (nothing was started)" in result.output
    assert "Traceback" not in result.output


def _signalled(sig: signal.Signals) -> object:
    """Work that gets `sig` and would go on for SIGNAL_WAIT_S: the handler must end it."""
    os.kill(os.getpid(), sig)
    deadline = time.monotonic() + SIGNAL_WAIT_S
    while time.monotonic() < deadline:  # the handler runs between these sleeps and ends the work
        time.sleep(0.01)
    raise AssertionError(f"{sig.name} did not end the work within {SIGNAL_WAIT_S:.0f}s")
