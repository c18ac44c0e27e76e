"""`bench serve --multi-turn`: a failed turn ends its conversation, and the turns it leaves unsent count as failed
requests (a run of C x T turns reports C x T requests), each saying at which turn its conversation stopped."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server


def _run(url: str, out: Path, *extra: str) -> Any:
    return CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--multi-turn", "--num-conversations", "1",
                                          "--num-turns", "4", "--system-prompt-len", "3", "--random-input-len", "2",
                                          "--random-output-len", "2", "--result-filename", str(out), *extra])


def test_the_turns_after_a_failed_one_count_as_failed(tmp_path: Path) -> None:
    out = tmp_path / "mt.json"
    with fake_server(fail_every=2) as (url, seen):  # turn 1 answered, turn 2 gets HTTP 500
        result = _run(url, out, "--endpoint", "/v1/chat/completions")
    assert result.exit_code == 0, result.output
    assert len(seen) == 2  # turns 3 and 4 were never sent
    doc = json.loads(out.read_text())
    assert doc["completed"] == 1 and doc["failed"] == 3 and len(doc["errors"]) == 4
    assert doc["errors"][0] == "" and "500" in doc["errors"][1]
    assert doc["errors"][2:] == ["not sent: the conversation stopped at turn 2 of 4, which failed"] * 2
    assert doc["multi_turn"]["requests"] == 1
    assert "not sent: the conversation stopped at turn 2" in " ".join(result.output.split())


def test_an_answer_without_token_ids_stops_the_conversation_and_counts_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "mt.json"
    with fake_server() as (url, seen):  # /v1/completions without return_token_ids support
        result = _run(url, out)
    assert result.exit_code == 1 and "every turn failed" in " ".join(result.output.split()), result.output
    assert len(seen) == 1
    doc = json.loads(out.read_text())
    assert doc["completed"] == 0 and doc["failed"] == 4
    assert "no token_ids" in doc["errors"][0]
    assert doc["errors"][1:] == ["not sent: the conversation stopped at turn 1 of 4, which failed"] * 3
