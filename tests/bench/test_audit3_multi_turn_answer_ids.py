"""`bench serve --multi-turn` over /v1/completions resends each answer's `token_ids` as the server's own tokens in
the next turn. An answer whose token_ids are not token ids fails its turn, naming them: such ids were dropped (a
string, a float, null) or passed on (a negative id, `true` as 1), and every later prompt of the conversation
quietly diverged from what the server had seen, so prefix-cache and KV figures measured another workload."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer


def _server(bad: object, prompts: list[Any]) -> FastAPI:
    """Answers three chunks; the second one's token_ids hold `bad`."""
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"id": "m"}]})

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        prompts.append((await request.json())["prompt"])

        async def events() -> AsyncIterator[bytes]:
            for ids in ([11], [bad], [12]):
                choice = {"index": 0, "text": "w", "token_ids": ids, "finish_reason": None}
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.mark.parametrize("bad", ["7", -1, True, 3.0, None])
def test_an_answer_with_ids_that_are_not_token_ids_fails_its_turn(bad: object) -> None:
    prompts: list[Any] = []
    with ThreadServer(_server(bad, prompts), PortAllocator("127.0.0.1").free("fake")) as fake:
        result = CliRunner().invoke(bench_app, [
            "serve", "--base-url", fake.url, "--multi-turn", "--num-conversations", "2", "--num-turns", "3",
            "--system-prompt-len", "4", "--random-input-len", "2", "--random-output-len", "3"])
    flat = " ".join(result.output.split())
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert (f"error: every turn failed; first error: ValueError: the answer's token_ids {json.dumps([bad])} are not "
            "token ids "
            "(integers >= 0)") in flat, flat
    assert len(prompts) == 2  # each conversation stopped at its first turn: nothing sent on a diverged prompt
