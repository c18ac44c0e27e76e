"""An API key no HTTP client can send passed check-config and serve: a YAML block scalar (`api_key: |`) ends the key
with a newline, and a key with a control character or surrounding whitespace can never equal what a client sends
(header values carry no newline, and their surrounding whitespace is stripped), so every request got a 401
`invalid API key` with nothing saying why. Now refused, naming the key's field and what to remove."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.config.cli_helpers import FREE_PORT, assert_invalid, invoke


@pytest.mark.parametrize(("yaml_value", "says"), [
    ("|\n    sk-abcdef123456\n", "ends with a newline"),
    ('"  sk-abcdef123456"', "starts with whitespace"),
    ('"sk-abc\\tdef123456"', "holds a tab"),
    ('"sk-abc\\u0000def"', "holds a control character (U+0000)"),
])
def test_a_yaml_api_key_no_client_can_send_is_refused(tmp_path: Path, yaml_value: str, says: str) -> None:
    config = tmp_path / "deploy.yaml"
    config.write_text(f"model:\n  path: tiny\nsecurity:\n  api_key: {yaml_value}\n")
    config.chmod(0o600)
    result = invoke(["check-config", str(config), "--device", "cpu", *FREE_PORT])
    assert_invalid(result, "security.api_key", says)
    assert "no HTTP client can send it" in result.output, result.output


def test_a_flag_api_key_with_a_newline_is_refused() -> None:
    result = invoke(["check-config", "--model", "tiny", "--device", "cpu", "--api-key", "sk-abc\ndef", *FREE_PORT])
    assert_invalid(result, "--api-key", "holds a newline")


def test_the_env_api_key_with_a_trailing_newline_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(os.environ, "PDLAUNCH_API_KEY", "sk-abcdef123456\n")
    result = invoke(["check-config", "--model", "tiny", "--device", "cpu", *FREE_PORT])
    assert_invalid(result, "PDLAUNCH_API_KEY", "ends with a newline")


def test_a_key_with_inner_spaces_still_passes() -> None:
    """`Authorization: Bearer a b` reaches the server as the key `a b`: that one is sendable."""
    result = invoke(["check-config", "--model", "tiny", "--device", "cpu", "--api-key", "sk abc def", *FREE_PORT])
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("how", ["flag", "env"])
def test_bench_serve_names_the_key_not_the_base_url(monkeypatch: pytest.MonkeyPatch, how: str) -> None:
    """bench serve sent such a key and blamed the server: `--base-url: ... gave no HTTP answer (LocalProtocolError:
    Illegal header value b'Bearer k\\n') (is that the OpenAI server's port?)`."""
    args = ["bench", "serve", "--base-url", "http://127.0.0.1:1", "--num-prompts", "1"]
    if how == "flag":
        args += ["--api-key", "sk-abc\ndef"]
    else:
        monkeypatch.setitem(os.environ, "PDLAUNCH_API_KEY", "sk-abcdef\n")
    result = invoke(args)
    assert result.exit_code == 1, result.output
    assert "--api-key: the key " in result.output and "no HTTP client can send it" in result.output, result.output
    assert "--base-url" not in result.output, result.output
