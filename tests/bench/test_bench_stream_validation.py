"""`bench serve` reads what a server streams as untrusted: a chunk that is not JSON, choices that are not objects,
usage counts that are not counts fail the request with a sentence saying so (not an exception's name, and not a
token counted out of no token); an https:// --base-url to a plain HTTP server, an --endpoint that is not a
completions path and an empty --model are refused naming the flag."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from tests.bench.fake_openai import fake_server
from tests.helpers.http_server import served

SMALL = ["--num-prompts", "2", "--random-input-len", "4", "--random-output-len", "2", "--model", "m"]


@contextmanager
def _streaming(body: bytes) -> Iterator[str]:
    """A server that answers every POST with `body` as an event stream; yields its http:// root."""

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            self._send(b'{"data": [{"id": "m"}]}', "application/json")

        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self._send(body, "text/event-stream")

        def _send(self, payload: bytes, kind: str) -> None:
            self.send_response(200)
            self.send_header("Content-Type", kind)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

    with served(ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
        yield url


def _output(*args: str) -> tuple[int | None, str]:
    result = CliRunner().invoke(bench_app, ["serve", *args])
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    return result.exit_code, " ".join(result.output.split())


@pytest.mark.parametrize(("stream", "said"), [
    (b"data: {not json\n\ndata: [DONE]\n\n", "a stream chunk is not JSON: {not json"),
    (b'data: {"choices": "text"}\n\ndata: [DONE]\n\n', "a stream chunk's choices are not a list of objects"),
    (b'data: {"choices": [5]}\n\ndata: [DONE]\n\n', "a stream chunk's choices are not a list of objects"),
    (b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: {"choices": [], "usage": {"completion_tokens": '
     b'"many"}}\n\ndata: [DONE]\n\n', "the stream's usage counts are not token counts"),
    (b'data: {"choices": [{"index": 0, "text": "a"}]}\n\ndata: {"choices": [], "usage": {"completion_tokens": 1, '
     b'"prompt_tokens": -4}}\n\ndata: [DONE]\n\n', "the stream's usage counts are not token counts"),
])
def test_a_malformed_stream_fails_its_request_saying_what_was_wrong(stream: bytes, said: str) -> None:
    with _streaming(stream) as url:
        code, text = _output("--base-url", url, *SMALL)
    assert code == 1, text
    assert f"all 2 requests failed; first error: {said}" in text, text


def test_https_to_a_plain_http_server_says_tls() -> None:
    with fake_server() as (url, seen):
        code, text = _output("--base-url", url.replace("http://", "https://"), *SMALL)
    assert code == 1, text
    assert "error: --base-url: the TLS handshake with https://" in text and "does the server speak https?" in text
    assert seen == []


@pytest.mark.parametrize(("args", "said"), [
    (["--endpoint", ""], "--endpoint: '' is not an OpenAI completions path"),
    (["--endpoint", "{url}/v1/completions"], "--endpoint: '{url}/v1/completions' is not an OpenAI completions path"),
    (["--endpoint", "/v1/models"], "--endpoint: '/v1/models' is not an OpenAI completions path"),
    (["--model", " "], "--model: is empty (an unset variable?)"),
])
def test_a_bad_endpoint_or_model_is_refused_before_a_request(args: list[str], said: str) -> None:
    with fake_server() as (url, seen):
        code, text = _output("--base-url", url, *[a for a in SMALL if a not in ("--model", "m")],
                             *[a.format(url=url) for a in args])
    assert code == 1, text
    assert f"error: {said.format(url=url)}" in text, text
    assert seen == []


@pytest.mark.parametrize("endpoint", ["/v1/completions/", " /v1/completions", "v1/chat/completions/ "])
def test_an_endpoint_the_check_accepts_is_sent_as_that_path(endpoint: str, tmp_path: Path) -> None:
    """A trailing slash or blank passed the --endpoint check (it looks at the path stripped) but was sent as typed:
    every request failed with `HTTP 307: ` (the server's redirect to the path without the slash, which the client
    does not follow) or a 404 for `/ /v1/completions`."""
    out = tmp_path / "r.json"
    with fake_server() as (url, seen):
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, *SMALL, "--endpoint", endpoint,
                                                "--result-filename", str(out)])
    assert result.exit_code == 0, result.output
    doc = json.loads(out.read_text())
    assert doc["completed"] == 2 and doc["endpoint"] == "/" + endpoint.strip().strip("/")
    assert len(seen) == 2
