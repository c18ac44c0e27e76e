"""`pdlaunch bench serve` against a deployment served with `--api-key`: the key goes with every request (--api-key
or PDLAUNCH_API_KEY, as `pdlaunch serve` takes it), a missing or wrong one is said as such before any prompt is
sent, and the key is never written to the result file."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server

runner = CliRunner()
KEY = "sekrit-key-123"
SMALL = ["--num-prompts", "3", "--random-input-len", "4", "--random-output-len", "3"]


def test_without_the_key_the_error_names_api_key_before_any_prompt() -> None:
    with fake_server(api_key=KEY) as (url, seen):
        result = runner.invoke(bench_app, ["serve", "--base-url", url, *SMALL], env={"PDLAUNCH_API_KEY": ""})
    assert result.exit_code == 1
    assert "--api-key:" in result.output and "answered HTTP 401: the server needs an API key" in result.output
    assert seen == []
    assert "Traceback" not in result.output


def test_a_wrong_key_is_said_as_refused() -> None:
    with fake_server(api_key=KEY) as (url, seen):
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--api-key", "other", *SMALL])
    assert result.exit_code == 1
    assert "the server refused the API key given" in result.output
    assert seen == []


def test_the_key_from_the_flag_is_sent_and_not_saved(tmp_path: Path) -> None:
    out = tmp_path / "res.json"
    with fake_server(api_key=KEY) as (url, seen):
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--api-key", KEY, *SMALL,
                                           "--result-filename", str(out)])
    assert result.exit_code == 0, result.output
    assert len(seen) == 3
    assert json.loads(out.read_text())["completed"] == 3
    assert KEY not in out.read_text()


def test_the_key_from_the_environment_is_sent_in_multi_turn_too() -> None:
    with fake_server(api_key=KEY) as (url, seen):
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--multi-turn",
                                           "--endpoint", "/v1/chat/completions", "--num-conversations", "1",
                                           "--num-turns", "2", "--random-input-len", "4", "--random-output-len", "2",
                                           "--system-prompt-len", "4"], env={"PDLAUNCH_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert len(seen) == 2


def test_a_key_beyond_ascii_is_sent_as_the_servers_take_it() -> None:
    """`pdlaunch serve` takes any key (its check reads the header as UTF-8 or latin-1); httpx refuses a str header
    beyond ASCII, and such a key ended the run in a UnicodeEncodeError traceback before any request."""
    key = "pässwort-ключ"
    with fake_server(api_key=key) as (url, seen):
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--api-key", key, *SMALL])
    assert result.exit_code == 0, (result.output, result.exception)
    assert len(seen) == 3
