"""A secret the config or a flag gets wrong is not printed back (review 76-I): the error says what is wrong and the
value's length, "(value hidden)", as the PDLAUNCH_DEPLOYMENT_SECRET check already did. The log_dir lock note, which
`pdlaunch smoke` and a second serve print, masks the value of --api-key."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from pdlaunch.launcher.log_dir_lock import LogDirInUse, LogDirLock, log_dir_holder
from tests.config.cli_helpers import FREE_PORT, assert_invalid, check

API_KEY = "987654321098765"
SECRET = "shortsecret42"


@pytest.mark.parametrize(("yaml_line", "field", "value", "said"), [
    (f"  api_key: {API_KEY}", "security.api_key", API_KEY, "input should be a valid string, got an int (value "
                                                            "hidden, 15 characters)"),
    (f"  deployment_secret: {SECRET}", "security.deployment_secret", SECRET,
     "string should have at least 16 characters, got a str (value hidden, 13 characters)"),
    (f"  api_key: [{API_KEY}]", "security.api_key", API_KEY, "input should be a valid string, got a list (value "
                                                              "hidden)"),
])
def test_check_config_does_not_print_a_bad_secret(tmp_path: Path, yaml_line: str, field: str, value: str,
                                                  said: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"model:\n  path: tiny\nsecurity:\n{yaml_line}\n")
    path.chmod(0o600)
    result = check([str(path), *FREE_PORT])
    assert_invalid(result, field, said)
    assert value not in result.output, result.output


def test_a_bad_api_key_flag_is_not_printed(tmp_path: Path) -> None:
    result = check(["--model", "tiny", "--api-key", "sk-abc\n", *FREE_PORT])
    assert result.exit_code == 1, result.output
    assert "sk-abc" not in result.output, result.output


def test_other_fields_still_show_their_value() -> None:
    result = check(["--model", "tiny", "--max-model-len", "12.5", *FREE_PORT])
    assert result.exit_code == 1 and "12.5" in result.output, result.output


@pytest.mark.parametrize("argv", [
    ["pdlaunch", "serve", "--model", "tiny", "--api-key", "sk-live-abcdef123456"],
    ["pdlaunch", "serve", "--model", "tiny", "--api-key=sk-live-abcdef123456"],
])
def test_the_lock_note_masks_the_api_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, argv: list[str]) -> None:
    monkeypatch.setattr(sys, "argv", argv)
    lock = LogDirLock(tmp_path)
    lock.acquire("http://127.0.0.1:8000")
    try:
        holder = log_dir_holder(tmp_path)
        with pytest.raises(LogDirInUse) as refused:
            LogDirLock(tmp_path).acquire(None)
    finally:
        lock.release()
    assert holder is not None and "sk-live" not in holder, holder
    assert "--api-key" in holder and "--model tiny" in holder, holder
    assert "sk-live" not in refused.value.message
