"""`bench serve` against servers whose streams go wrong: a request counts as a success only when its stream
ran to its end ([DONE]) and the server did not end it as aborted or failed."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer


def _app(mode: str) -> FastAPI:
    """Every other request streams normally; the others go wrong as `mode` says."""
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"id": "m"}]})
    count = [0]

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = await request.json()
        count[0] += 1
        bad = count[0] % 2 == 0
        n = int(body["max_tokens"])

        async def events() -> AsyncIterator[bytes]:
            if bad and mode == "no-token":  # one chunk with no text, and usage counting no token
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': '', 'finish_reason': 'stop'}]})}\n\n" \
                    .encode()
                usage = {"prompt_tokens": 4, "completion_tokens": 0, "total_tokens": 4}
                yield f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode()
                yield b"data: [DONE]\n\n"
                return
            for i in range(n):
                cut = bad and i == n // 2
                if cut and mode == "cut":
                    return  # the stream ends cleanly, without usage or [DONE], as a proxy relaying a dead instance
                reason = "abort" if cut and mode == "abort" else ("length" if i == n - 1 else None)
                yield f"data: {json.dumps({'choices': [{'index': 0, 'text': ' t', 'finish_reason': reason}]})}\n\n" \
                    .encode()
                if reason == "abort":
                    break
            if mode == "not-a-mapping" and bad:
                yield b"data: [1, 2]\n\n"
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _run(mode: str, tmp_path: Path) -> tuple[int, str, dict[str, Any]]:
    out = tmp_path / "r.json"
    with ThreadServer(_app(mode), PortAllocator("127.0.0.1").free("test server")) as server:
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", server.url, "--num-prompts", "4",
                                                "--random-input-len", "4", "--random-output-len", "8",
                                                "--max-concurrency", "1", "--result-filename", str(out)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output, json.loads(out.read_text())


def test_a_stream_cut_short_before_done_is_a_failed_request(tmp_path: Path) -> None:
    code, output, doc = _run("cut", tmp_path)
    assert code == 0, output
    assert doc["completed"] == 2 and doc["failed"] == 2
    assert doc["total_output_tokens"] == 16  # the two whole answers only
    assert sum("[DONE]" in err for err in doc["errors"]) == 2


def test_a_request_the_server_aborted_is_a_failed_request(tmp_path: Path) -> None:
    code, output, doc = _run("abort", tmp_path)
    assert code == 0, output
    assert doc["completed"] == 2 and doc["failed"] == 2
    assert sum("abort" in err for err in doc["errors"]) == 2


def test_an_answer_the_server_counts_no_token_for_is_a_failed_request(tmp_path: Path) -> None:
    """A chunk without a token times nothing: counted as one token (the chunk count) and as a success, its TTFT
    and goodput would stand for an answer that never came."""
    code, output, doc = _run("no-token", tmp_path)
    assert code == 0, output
    assert doc["completed"] == 2 and doc["failed"] == 2
    assert doc["total_output_tokens"] == 16  # the two whole answers only, not one per empty chunk
    assert sum("0 completion tokens" in err for err in doc["errors"]) == 2


def test_a_chunk_that_is_no_json_object_fails_its_request_not_the_run(tmp_path: Path) -> None:
    code, output, doc = _run("not-a-mapping", tmp_path)
    assert code == 0, output
    assert doc["completed"] == 2 and doc["failed"] == 2
    assert "Traceback" not in output


def test_a_port_that_closes_without_an_http_answer_names_base_url() -> None:
    """A port whose server is no HTTP server (it accepts and closes): one line naming --base-url, exit 1."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        stop = threading.Event()

        def close_each() -> None:
            listener.settimeout(0.2)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.close()

        thread = threading.Thread(target=close_each, daemon=True)
        thread.start()
        try:
            port = listener.getsockname()[1]
            result = CliRunner().invoke(bench_app, ["serve", "--base-url", f"http://127.0.0.1:{port}",
                                                    "--num-prompts", "2"])
        finally:
            stop.set()
            thread.join(10)
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "--base-url" in result.output and "Traceback" not in result.output


def test_a_model_list_without_ids_names_model(tmp_path: Path) -> None:
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"object": "model"}]})
    with ThreadServer(app, PortAllocator("127.0.0.1").free("test server")) as server:
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", server.url, "--num-prompts", "2"])
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "--model" in result.output


def test_an_error_text_with_markup_brackets_is_printed_as_it_is(tmp_path: Path) -> None:
    """The report prints the first errors; a server's text such as `[/INST]` is not rich markup (it crashed the
    report, before the JSON was written)."""
    app = FastAPI()
    app.get("/v1/models")(lambda: {"data": [{"id": "m"}]})
    app.post("/v1/completions")(lambda: PlainTextResponse("prompt ends in [/INST] [bold]", status_code=400))
    out = tmp_path / "r.json"
    with ThreadServer(app, PortAllocator("127.0.0.1").free("test server")) as server:
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", server.url, "--num-prompts", "2",
                                                "--random-input-len", "4", "--random-output-len", "4",
                                                "--result-filename", str(out)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "HTTP 400: prompt ends in [/INST] [bold]" in result.output
    assert json.loads(out.read_text())["failed"] == 2
