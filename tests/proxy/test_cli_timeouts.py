"""`python -m pdlaunch.proxy`'s timeout flags are checked as its other flags are: a usage error (exit 1) naming the
flag. Before, --request-timeout 0 or -1 started a proxy that answered every request 504 at once, nan one that answered
every request 500 with a traceback in its log (`deadline must not be NaN`), and --drain-timeout nan or inf a
traceback at startup."""

from __future__ import annotations

import pytest

from pdlaunch.proxy.__main__ import parse_args

INSTANCES = ["--prefill", "http://127.0.0.1:8100", "--decode", "http://127.0.0.1:8200"]


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf"])
def test_a_request_timeout_that_is_no_positive_number_of_seconds_is_a_usage_error(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args([*INSTANCES, "--request-timeout", value])
    assert exited.value.code == 1
    assert "--request-timeout must be a positive number of seconds" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["-1", "nan", "inf"])
def test_a_drain_timeout_that_is_no_number_of_seconds_is_a_usage_error(
        value: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exited:
        parse_args([*INSTANCES, "--drain-timeout", value])
    assert exited.value.code == 1
    assert "--drain-timeout must be 0 or more seconds" in capsys.readouterr().err


def test_timeouts_in_range_are_taken() -> None:
    args = parse_args([*INSTANCES, "--request-timeout", "0.5", "--drain-timeout", "0"])
    assert (args.request_timeout, args.drain_timeout) == (0.5, 0.0)
