"""`--backend ray` on a cluster whose nodes Ray knows by IPv6 address (Ray supports IPv6 clusters; its
NodeManagerAddress is then e.g. `fd00::2`): the launcher reaches each instance, and hands it to the proxy, at
`http://[ADDRESS]:PORT`. Before, the URL went unbracketed: the first health probe of a started instance raised
httpx.InvalidURL (a traceback ending the deployment) and the proxy got URLs it could not use. Stand-ins for the
ray module; an instance's /health answered on this machine's IPv6 loopback."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray_proxy  # noqa: E402 (after the importorskip)
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 (http.server's name)
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


class _IPv6Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6


@pytest.fixture
def instance_port() -> Iterator[int]:
    """An instance's /health at [::1]:PORT."""
    try:
        server = _IPv6Server(("::1", 0), _Health)
    except OSError as exc:
        pytest.skip(f"no IPv6 loopback here: {exc}")
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        server.server_close()


class _Proxy:
    """The proxy's ChildProcess, recording the command line it would run."""

    argv: list[str] = []

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 tmp_dir_flag: str | None = None) -> None:
        _Proxy.argv = argv

    def start(self, note: str | None = None) -> None:
        pass


def test_an_instance_on_an_ipv6_node_is_reached_and_handed_to_the_proxy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, instance_port: int) -> None:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    prefill, decode = deployment.runs
    prefill.spec = prefill.plan.spec.model_copy(update={"host": "::1", "port": instance_port})
    decode.spec = decode.plan.spec.model_copy(update={"host": "fd00::2", "port": 9001})
    assert prefill.url == f"http://[::1]:{instance_port}"
    assert deployment.answers(prefill)

    monkeypatch.setattr(ray_proxy, "ChildProcess", _Proxy)
    deployment.proxy.start(deployment.runs, note=None)
    argv = " ".join(_Proxy.argv)
    assert f"--prefill prefill-0=http://[::1]:{instance_port}" in argv, argv
    assert "--decode decode-0=http://[fd00::2]:9001" in argv, argv
