"""What the launcher reads from an instance's /info (the status table's KV blocks) and /health (its readiness) is
checked: an answer of another shape (another server on the port, a foreign node's service, a garbled body) leaves the
column unknown, and is not taken for the instance's readiness, instead of ending the launcher with a traceback or
announcing a deployment that is not serving."""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.process import ChildProcess
from pdlaunch.launcher.status import StatusRow
from tests.helpers.http_server import served

BODIES = {
    "list": b"[1, 2, 3]",
    "strings": b'{"num_blocks_used": "many", "num_blocks_total": {"a": 1}}',
    "not utf-8": b"\xff\xfe\x80{",
    "null": b"null",
}


class _Info(BaseHTTPRequestHandler):
    body = b""

    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(self.body)))
        self.end_headers()
        self.wfile.write(self.body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(params=sorted(BODIES))
def info_url(request: pytest.FixtureRequest) -> Iterator[str]:
    handler = type("Info", (_Info,), {"body": BODIES[request.param]})
    with served(ThreadingHTTPServer(("127.0.0.1", 0), handler)) as url:
        yield url


def test_an_info_answer_of_another_shape_leaves_the_blocks_unknown(info_url: str, tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "proxy": {"port": 0}})
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path)
    try:
        plan = deployment.plan.instances[0]
        plan.url = info_url
        row = deployment.rows[plan.spec.name] = StatusRow(plan.spec.name, "colocated", "cpu", info_url)
        deployment.refresh_blocks(plan.spec.name)
        assert (row.blocks_used, row.blocks_total, row.blocks) == (None, None, "-")
    finally:
        deployment.stop()


@pytest.fixture()
def health_server() -> Iterator[tuple[str, list[bytes]]]:
    """A server whose /health answers 200 with the body last put in the list."""
    bodies: list[bytes] = [b"{}"]

    class Health(_Info):
        @property  # type: ignore[override]
        def body(self) -> bytes:
            return bodies[-1]

    server = ThreadingHTTPServer(("127.0.0.1", 0), Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", bodies
    finally:
        server.shutdown()
        server.server_close()


def test_another_servers_health_at_an_instance_port_is_not_its_readiness(
        health_server: tuple[str, list[bytes]], tmp_path: Path) -> None:
    """Another deployment's instance (another engine_id) or any service with a /health that took the port while
    the instance loaded: the row says so, and the launcher waits for the instance's own answer (or its exit)."""
    url, bodies = health_server
    cfg = DeploymentConfig.model_validate({"device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
                                           "proxy": {"port": 0}})
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path)
    try:
        plan = deployment.plan.instances[0]
        plan.url = url
        child = ChildProcess(plan.spec.name, ["true"], tmp_path / "x.log")  # never started: only its name is asked
        deployment.rows[plan.spec.name] = StatusRow(plan.spec.name, "colocated", "cpu", url)
        for other in (b'{"status": "ok", "role": "colocated", "engine_id": "another-deployment-colocated-0"}',
                      b'{"status": "ok"}', b"OK", b"[]"):
            bodies.append(other)
            assert deployment._probe(child) == "port taken", other  # noqa: SLF001
        bodies.append(json.dumps({"status": "ok", "engine_id": plan.spec.engine_id}).encode())
        assert deployment._probe(child) == "ready"  # noqa: SLF001
    finally:
        deployment.stop()


def test_the_proxy_is_ready_once_it_sees_every_instance_ready(health_server: tuple[str, list[bytes]],
                                                              tmp_path: Path) -> None:
    """The proxy's /health is 200 once every role has a ready instance; it probes each instance once a second, so
    it may answer 200 before it has seen the last one the launcher found ready. The launcher waits for that (its
    "ready" line then means every instance gets requests), the row naming what the proxy sees."""
    url, bodies = health_server
    cfg = DeploymentConfig.model_validate({"device": "cpu", "instances": [{"role": "prefill"},
                                                                         {"role": "decode", "count": 2}],
                                           "proxy": {"port": 0}})
    deployment = Deployment(cfg, Console(file=io.StringIO()), log_dir=tmp_path)
    try:
        deployment.plan.proxy_port = int(url.rsplit(":", 1)[1])
        assert deployment.plan.proxy_url == url
        proxy = deployment.proxy = ChildProcess("proxy", ["true"], tmp_path / "proxy.log")  # never started
        deployment.rows["proxy"] = StatusRow("proxy", "proxy", "-", url)

        def answer(states: dict[str, str]) -> str:
            listed = [{"name": p.spec.name, "url": p.url, "state": states.get(p.spec.name, "ready")}
                      for p in deployment.plan.instances]
            bodies.append(json.dumps({"status": "ok", "instances": listed}).encode())
            return deployment._probe(proxy)  # noqa: SLF001

        assert answer({"decode-1": "starting"}) == "sees decode-1 starting"
        assert deployment.rows["proxy"].state == "sees decode-1 starting"
        assert answer({"prefill-0": "stalled", "decode-1": "starting"}) == "sees prefill-0 stalled, decode-1 starting"
        assert answer({}) == "ready"
    finally:
        deployment.stop()
