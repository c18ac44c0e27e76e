"""PDLAUNCH_LOG_LEVEL set to what is no level (`debgu`): the proxy and the instances log at info and cannot say why,
so check-config and serve warn, naming the variable; a level in any case is read as it is."""

from __future__ import annotations

import logging

import pytest

from pdlaunch.config.loader import load_valid_deployment
from pdlaunch.config.log_level import LOG_LEVELS
from tests.config.cli_helpers import check

CPU = ["--model", "tiny", "--device", "cpu"]


@pytest.mark.parametrize("value", ["debgu", "verbose", "warn", ""])
def test_check_config_warns_about_a_value_that_is_no_level(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PDLAUNCH_LOG_LEVEL", value)
    result = check(CPU)
    assert result.exit_code == 0, result.output
    assert f"warning: PDLAUNCH_LOG_LEVEL: {value!r} is not a log level, so the proxy and the instances log at info" \
        in result.output, result.output


@pytest.mark.parametrize("value", [*LOG_LEVELS, "DEBUG", "Warning"])
def test_a_level_in_any_case_is_no_warning(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("PDLAUNCH_LOG_LEVEL", value)
    result = check(CPU)
    assert result.exit_code == 0 and "PDLAUNCH_LOG_LEVEL" not in result.output, result.output


def test_serve_warns_before_it_starts(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PDLAUNCH_LOG_LEVEL", "debgu")
    caplog.set_level(logging.WARNING, logger="pdlaunch.config.loader")
    load_valid_deployment(None, {"model.path": "tiny", "device": "cpu"})
    assert any(r.getMessage().startswith("warning: PDLAUNCH_LOG_LEVEL: 'debgu' is not a log level")
               for r in caplog.records), [r.getMessage() for r in caplog.records]
