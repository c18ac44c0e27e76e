"""`pdlaunch bench serve --base-url` at an HTTP server that is not an OpenAI-compatible one (a static file server,
another service's port): the error names --base-url, and the server's HTML error page is one readable line."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.bench.openai_client import error_body_text
from tests.helpers.http_server import served

runner = CliRunner()


class _QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 (the base class's name)
        """No access log on the test's stderr."""


@contextmanager
def static_server(root: Path) -> Iterator[str]:
    """Python's file server over `root`: GET /v1/models is 404, every POST 501 with an HTML page."""
    with served(ThreadingHTTPServer(("127.0.0.1", 0), partial(_QuietHandler, directory=str(root)))) as url:
        yield url


def test_a_server_without_v1_models_is_said_as_a_base_url_problem(tmp_path: Path) -> None:
    with static_server(tmp_path) as url:
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--num-prompts", "2"])
    assert result.exit_code == 1
    assert f"--base-url: {url}/v1/models answered HTTP 404" in result.output
    assert "OpenAI-compatible" in result.output
    assert "--model:" not in result.output
    assert "Traceback" not in result.output


def test_an_html_error_page_is_one_line_without_markup(tmp_path: Path) -> None:
    with static_server(tmp_path) as url:
        result = runner.invoke(bench_app, ["serve", "--base-url", url, "--model", "m", "--num-prompts", "2",
                                           "--random-input-len", "4", "--random-output-len", "2"])
    assert result.exit_code == 1
    assert "all 2 requests failed" in result.output
    assert "HTTP 501: " in result.output and "Unsupported method ('POST')" in result.output
    assert "<html" not in result.output.lower() and "<p>" not in result.output
    # each error a line: the page's own line breaks are gone
    errors = [line for line in result.output.splitlines() if "HTTP 501" in line]
    assert len(errors) == 3 and all("Unsupported method" in line for line in errors), result.output


def test_an_error_pages_style_and_script_are_not_its_text() -> None:
    """A page whose head carries CSS (Tomcat's, a CDN's) or a script: their code is no text of the page, and, kept,
    it filled the 300 characters before the page's words (`HTTP Status 404 – Not Found body {font-family:...`)."""
    css = "body {font-family:Tahoma,Arial,sans-serif;} h1, h2, h3, b {color:white;background-color:#525D76;} " * 4
    page = (f'<!doctype html><html lang="en"><head><title>HTTP Status 502 – Bad Gateway</title>'
            f'<style type="text/css">{css}</style><script>var x = "<b>" ;</script><!-- <p>a note</p> --></head>'
            "<body><h1>HTTP Status 502 – Bad Gateway</h1><p><b>Description</b> The upstream is down.</p></body></html>")
    text = error_body_text(page, "text/html;charset=utf-8")
    assert text == "HTTP Status 502 – Bad Gateway HTTP Status 502 – Bad Gateway Description The upstream is down."
