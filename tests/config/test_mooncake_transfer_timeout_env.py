"""MC_TRANSFER_TIMEOUT, Mooncake's own transfer timeout, set to a value Mooncake reads as another number than it
looks like (`120s` is 120 s there, `abc` or `1.5e3` 5 s: tests/kv_transfer/test_mooncake_release_wait.py) is a
problem of check-config and of serve with the mooncake connector, before anything starts: the variable, the value,
what Mooncake makes of it and what to set."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.config.cli_helpers import check, invoke

MOONCAKE = ["--model", "tiny", "--device", "cpu", "--kv-connector", "mooncake"]
VARIABLE = "MC_TRANSFER_TIMEOUT"
# value -> what Mooncake's transfer engine reads it as, in seconds
BAD = {"120s": 120, "1.5e3": 5, "abc": 5, "": 5, "-1": 5, "0": 5, "4": 5, "4294967396": 100, "45O": 45}


def _line(output: str, value: str) -> str:
    """The error line about the variable, joined where the console wrapped it."""
    text = " ".join(output.split())
    start = text.find(f"error: {VARIABLE}: {value!r} ")
    assert start >= 0, output
    return text[start:]


@pytest.mark.parametrize(("value", "seconds"), BAD.items())
def test_check_config_refuses_a_timeout_mooncake_reads_otherwise(monkeypatch: pytest.MonkeyPatch, value: str,
                                                                  seconds: int) -> None:
    monkeypatch.setenv(VARIABLE, value)
    result = check(MOONCAKE)
    assert result.exit_code == 1, result.output
    line = _line(result.output, value)
    assert line.startswith(f"error: {VARIABLE}: {value!r} is not a whole number of seconds from 5 to 2147483647: "
                           f"Mooncake's transfer engine would read it as {seconds} s"), line
    assert "set it to a whole number of seconds, e.g. 30 (Mooncake's default when it is unset), or unset it" in line


def test_more_digits_than_python_converts_are_read_as_mooncake_reads_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """Python's int() refuses a string of more than 4300 digits (ValueError, a traceback of check-config), where
    strtol reads it: nines stop at LONG_MAX, which Mooncake cuts to the int -1 (5 s); zeros before 45 are 45 s."""
    monkeypatch.setenv(VARIABLE, "9" * 5000)
    result = check(MOONCAKE)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception
    text = " ".join(result.output.split())
    assert f"error: {VARIABLE}: '{'9' * 20}" in text, text[:500]
    assert "Mooncake's transfer engine would read it as 5 s" in text, text[-500:]
    monkeypatch.setenv(VARIABLE, "0" * 5000 + "45")
    result = check(MOONCAKE)
    assert result.exit_code == 0 and VARIABLE not in result.output, result.output[-500:]


def test_serve_refuses_it_before_anything_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    started: list[object] = []
    monkeypatch.setattr("pdlaunch.launcher.backends.run_deployment", lambda cfg: started.append(cfg) or 0)
    monkeypatch.setenv(VARIABLE, "120s")
    served = invoke(["serve", *MOONCAKE])
    assert served.exit_code == 1 and not started, served.output
    assert _line(served.output, "120s").startswith(f"error: {VARIABLE}: '120s' is not a whole number of seconds")


# "+40": strtol takes the sign, and Mooncake reads 40 (tests/kv_transfer/test_mooncake_release_wait.py READINGS)
@pytest.mark.parametrize("value", ["5", "30", "300", " 120 ", "2147483647", "+40", "030"])
def test_a_whole_number_of_seconds_mooncake_takes_as_it_is_passes(monkeypatch: pytest.MonkeyPatch,
                                                                  value: str) -> None:
    monkeypatch.setenv(VARIABLE, value)
    result = check(MOONCAKE)
    assert result.exit_code == 0 and VARIABLE not in result.output, result.output


@pytest.mark.parametrize("args", [["--kv-connector", "nixl"], ["--colocated"]])
def test_without_mooncake_the_variable_is_not_read(monkeypatch: pytest.MonkeyPatch, args: list[str]) -> None:
    monkeypatch.setenv(VARIABLE, "120s")
    result = check(["--model", "tiny", "--device", "cpu", *args])
    assert VARIABLE not in result.output, result.output


def test_the_readme_troubleshooting_row_is_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(VARIABLE, "120s")
    said = _line(check(MOONCAKE).output, "120s").removeprefix("error: ")
    readme = " ".join((Path(__file__).resolve().parents[2] / "README.md").read_text().split())
    documented = readme[readme.index(f"| `{VARIABLE}: "):].split("`")[1].removesuffix(" ...")
    assert said.startswith(documented), (documented, said)
