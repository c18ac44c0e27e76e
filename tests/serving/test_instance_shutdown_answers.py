"""What a client whose request is still running gets when an instance's drain at shutdown runs out: a non-streaming
request a 503 JSON error with code shutting_down and `Retry-After: 1`, a stream a shutting_down error event then
[DONE] (it was a bare `500 Internal Server Error` text, a cut stream, and a traceback in the instance's log: uvicorn
cancelled the request's task at its graceful-shutdown deadline). Through `python -m pdlaunch.server` as the
launcher starts it (the tiny model on CPU, about 30 tokens a second here: a 1500-token request outlasts the drain),
SIGTERM as the launcher sends it."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import internal_headers
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.__main__ import GRACEFUL_SHUTDOWN_S
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.instance_process import instance_process

TIMEOUT_S = 120.0
SECRET = "test-deployment-secret-0123456789"
LONG = {"max_tokens": 1500, "ignore_eos": True}  # ~50 s of the tiny model on CPU: still running at the drain's end


@contextmanager
def instance(tmp_path: Path, launcher: bool = False, migration_limit: int = 3,
             ) -> Iterator[tuple[str, subprocess.Popen[bytes], Path]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 2048}, "cache": {"num_gpu_blocks": 512, "block_size": 8},
        "security": {"deployment_secret": SECRET}, "proxy": {"migration_limit": migration_limit}})
    with instance_process(tmp_path, cfg, {"role": "colocated", "engine_id": "shutdown-answers"}, launcher) as up:
        yield up


def _running(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10, trust_env=False).text.splitlines():
        if line.startswith("pdlaunch_requests_running"):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


class Stream(threading.Thread):
    """A long streamed completion read to its end: its `data:` payloads, and whether it ended whole (no cut)."""

    def __init__(self, url: str, headers: dict[str, str] | None = None) -> None:
        super().__init__(daemon=True)
        self.url, self.headers = url, headers or {}
        self.events: list[str] = []
        self.streaming = threading.Event()
        self.whole = False

    def run(self) -> None:
        with httpx.stream("POST", f"{self.url}/v1/completions", timeout=TIMEOUT_S, trust_env=False,
                          headers=self.headers, json={"prompt": "stream a while", "stream": True, **LONG}) as response:
            for line in response.iter_lines():
                if line.startswith("data: "):
                    self.events.append(line[6:])
                    self.streaming.set()
        self.whole = True


@pytest.mark.slow
def test_sigterm_answers_what_the_drain_cuts_with_shutting_down_and_no_traceback(tmp_path: Path) -> None:
    """A client's stream ends with the shutting_down event, and so does the proxy's (its internal token): the proxy
    takes the event for its decode gone and continues the stream on another where it can, and passes it on to its
    client where it cannot (proxy/migrate.py); the instance cannot tell which. It ended the proxy's stream bare."""
    with instance(tmp_path) as (url, proc, log):
        client, proxy = Stream(url), Stream(url, internal_headers(SECRET))
        client.start()
        proxy.start()
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/completions", timeout=TIMEOUT_S, trust_env=False,
                                 json={"prompt": "answer at length", **LONG})
            for stream in (client, proxy):
                assert stream.streaming.wait(TIMEOUT_S), f"no streamed token within {TIMEOUT_S}s"
            wait_for(lambda: _running(url) >= 3, "the streams and the request to run", TIMEOUT_S, poll=0.2)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            r = answer.result(TIMEOUT_S)
        waited = time.monotonic() - sent
        client.join(TIMEOUT_S)
        proxy.join(TIMEOUT_S)
        # uvicorn re-raises the SIGTERM it caught once it has shut down
        assert proc.wait(TIMEOUT_S) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    assert r.status_code == 503, (r.status_code, r.text[:300], text[-3000:])
    assert r.json()["error"]["code"] == "shutting_down" and "shutting down" in r.json()["error"]["message"], r.text
    assert r.headers["retry-after"] == "1", r.headers
    assert waited < GRACEFUL_SHUTDOWN_S + 5, waited  # answered at the drain's end
    for stream in (client, proxy):
        assert stream.whole and stream.events[-1] == "[DONE]", stream.events[-3:]
        assert json.loads(stream.events[-2])["error"]["code"] == "shutting_down", stream.events[-3:]
    for bad in ("Traceback", "graceful shutdown exceeded", "Exception in ASGI application"):
        assert bad not in text, text[-3000:]


@pytest.mark.slow
@pytest.mark.parametrize("migration_limit", [3, 0])
def test_a_stream_through_the_proxy_to_its_only_instance_ends_with_shutting_down(tmp_path: Path,
                                                                                migration_limit: int) -> None:
    """One colocated instance (its pod deleted, SIGTERM) behind the proxy: its drain cuts the client's stream, which
    has no other instance to go on on, with migration on or off: the client gets the shutting_down event then [DONE],
    which says to retry on a running server. With migration on it got `502 instance_failed ... closed the stream
    before it finished` (the instance ended the proxy's stream bare, for the proxy to continue elsewhere)."""
    ports = PortAllocator("127.0.0.1")
    with instance(tmp_path, migration_limit=migration_limit) as (url, proc, log):
        pool = InstancePool([Instance("colocated", url, "colocated-0")])
        app = build_proxy_app(pool, TIMEOUT_S, deployment_secret=SECRET, migration_limit=migration_limit)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: pool.instances[0].state == "ready", "the proxy to see the instance", TIMEOUT_S)
            client = Stream(proxy.url)
            client.start()
            assert client.streaming.wait(TIMEOUT_S), f"no streamed token within {TIMEOUT_S}s"
            proc.send_signal(signal.SIGTERM)
            client.join(TIMEOUT_S)
            assert proc.wait(TIMEOUT_S) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    assert client.whole and client.events[-1] == "[DONE]", client.events[-3:]
    error = json.loads(client.events[-2])["error"]
    assert error["code"] == "shutting_down" and "retry" in error["message"], client.events[-3:]
    assert "Traceback" not in log.read_text(errors="replace")


@pytest.mark.slow
def test_sigterm_ends_an_open_kv_events_stream_cleanly(tmp_path: Path) -> None:
    """The KV events stream a proxy follows (NDJSON, open until the engine stops) ended only by uvicorn's deadline:
    a cut connection and a traceback in the instance's log. It ends at the drain's end like the others, whole lines,
    and the client reconnects (server/kv_events.py)."""
    lines: list[str] = []
    opened = threading.Event()
    ended: list[BaseException | None] = []
    with instance(tmp_path) as (url, proc, log):
        def follow() -> None:
            try:
                with httpx.stream("GET", f"{url}/v1/kv_events", timeout=TIMEOUT_S, trust_env=False) as response:
                    for line in response.iter_lines():
                        lines.append(line)
                        opened.set()
                ended.append(None)
            except httpx.HTTPError as exc:
                ended.append(exc)

        reader = threading.Thread(target=follow, daemon=True)
        reader.start()
        assert opened.wait(TIMEOUT_S), f"no snapshot within {TIMEOUT_S}s"
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        reader.join(TIMEOUT_S)
        waited = time.monotonic() - sent
        assert proc.wait(TIMEOUT_S) in (0, -signal.SIGTERM), log.read_text()[-3000:]
    text = log.read_text(errors="replace")
    assert ended == [None], (ended, text[-3000:])  # the stream ended whole, not cut
    assert json.loads(lines[0])["engine_id"] == "shutdown-answers", lines[:1]
    assert waited < GRACEFUL_SHUTDOWN_S + 5, waited
    for bad in ("Traceback", "graceful shutdown exceeded", "Exception in ASGI application"):
        assert bad not in text, text[-3000:]


@pytest.mark.slow
def test_a_launcher_gone_answers_what_the_drain_cuts_with_shutting_down(tmp_path: Path) -> None:
    """The instance's watchdog stops it when its launcher is gone (killed: no signal reaches the instance); only a
    signal told the app that shutdown began, so a request still running got uvicorn's bare 500 there."""
    with instance(tmp_path, launcher=True) as (url, proc, log):
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(httpx.post, f"{url}/v1/completions", timeout=TIMEOUT_S, trust_env=False,
                                 json={"prompt": "answer at length", **LONG})
            wait_for(lambda: _running(url) >= 1, "the request to run", TIMEOUT_S, poll=0.2)
            proc.kill()
            r = answer.result(TIMEOUT_S)
        wait_for(lambda: "Finished server process" in log.read_text(errors="replace"), "the instance to stop",
                 TIMEOUT_S, poll=0.2)
    text = log.read_text(errors="replace")
    assert "is gone; shutting down" in text, text[-3000:]
    assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down", (r.status_code, r.text[:300])
    assert r.headers["retry-after"] == "1", r.headers
    for bad in ("Traceback", "graceful shutdown exceeded", "Exception in ASGI application"):
        assert bad not in text, text[-3000:]
