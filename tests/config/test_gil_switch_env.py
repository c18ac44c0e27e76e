"""PDLAUNCH_GIL_SWITCH_MS: how long an instance's threads (the engine thread, the HTTP event loop) may hold the GIL
before another gets it. Each instance process sets it before anything runs (0.5 ms unless set); a value that is no
positive number of milliseconds up to 100 leaves the default, and check-config and serve say so, naming it."""

from __future__ import annotations

import logging
import sys

import pytest

from pdlaunch.config.gil_switch import DEFAULT_GIL_SWITCH_MS, gil_switch_seconds
from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.server.__main__ import main as instance_main
from tests.config.cli_helpers import check

CPU = ["--model", "tiny", "--device", "cpu"]


def test_the_default_and_a_given_interval() -> None:
    assert gil_switch_seconds({}) == DEFAULT_GIL_SWITCH_MS / 1000 == 0.0005
    assert gil_switch_seconds({"PDLAUNCH_GIL_SWITCH_MS": "5"}) == 0.005  # Python's own
    assert gil_switch_seconds({"PDLAUNCH_GIL_SWITCH_MS": " 0.25 "}) == 0.00025


@pytest.mark.parametrize("value", ["fast", "0", "-1", "nan", "inf", "1000", ""])
def test_a_bad_value_is_a_warning_and_the_default(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    assert gil_switch_seconds({"PDLAUNCH_GIL_SWITCH_MS": value}) == 0.0005
    monkeypatch.setenv("PDLAUNCH_GIL_SWITCH_MS", value)
    result = check(CPU)
    assert result.exit_code == 0, result.output
    assert f"warning: PDLAUNCH_GIL_SWITCH_MS: {value!r} is not a number of milliseconds in (0, 100]" in \
        " ".join(result.output.split()), result.output


def test_a_good_value_is_no_warning(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PDLAUNCH_GIL_SWITCH_MS", "2")
    result = check(CPU)
    assert result.exit_code == 0 and "PDLAUNCH_GIL_SWITCH_MS" not in result.output, result.output


def test_serve_warns_before_it_starts(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PDLAUNCH_GIL_SWITCH_MS", "fast")
    caplog.set_level(logging.WARNING, logger="pdlaunch.config.loader")
    load_valid_deployment(None, {"model.path": "tiny", "device": "cpu"})
    assert any(r.getMessage().startswith("warning: PDLAUNCH_GIL_SWITCH_MS: 'fast' is not a number of milliseconds")
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_an_instance_process_sets_it_before_anything_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first thing an instance's main does (here its arguments are bad, so it ends right after)."""
    set_to: list[float] = []
    monkeypatch.setattr(sys, "setswitchinterval", set_to.append)
    monkeypatch.setenv("PDLAUNCH_GIL_SWITCH_MS", "2")
    with pytest.raises(SystemExit):
        instance_main(["--no-such-flag"])
    assert set_to == [0.002]
