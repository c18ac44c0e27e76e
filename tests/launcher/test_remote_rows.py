"""Node 0's status rows of the instances other nodes run (a multi-node `pdlaunch serve`, and node 0's launcher
under `--backend slurm`, which is the same): after the start's wait set them ready, they follow each instance's
/health; they stayed "ready" after the instance died. The instance on node 1 is an HTTP double at 127.0.0.2
(another node's address on this machine's loopback); node 0's proxy and supervisor are real."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.errors import PdlaunchError
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.stall_watch import StallWatch, health_state
from pdlaunch.launcher.supervisor import SupervisionFailed, Supervisor

WAIT_S = 30.0  # the supervisor's health probe runs once a second; a loaded CI box is slow
SECURITY = {"deployment_secret": "remote-rows-test-secret-0123456789"}


class RemoteInstance:
    """/health and /info of an instance another node's launcher runs: ready, loading (503), or gone. Its
    /health names `engine_id` and `role`: node 1's own base engine_id (its uuid) and the instance's name."""

    def __init__(self) -> None:
        self.state = "ready"
        self.engine_id = "node1base-colocated-0"
        self.role = "colocated"
        instance = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                if self.path == "/info":
                    self._answer(200, {"num_blocks_used": 3, "num_blocks_total": 64})
                elif instance.state == "ready":
                    self._answer(200, {"status": "ok", "role": instance.role, "engine_id": instance.engine_id})
                else:
                    self._answer(503, {"status": instance.state, "error": {"message": f"instance is {instance.state}"}})

            def _answer(self, code: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.2", 0), Handler)
        self.port: int = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def die(self) -> None:
        """What node 0 sees of an instance whose process died: connections to its port are refused."""
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture()
def remote() -> Iterator[RemoteInstance]:
    instance = RemoteInstance()
    yield instance
    instance.die()


def _until(supervisor: Supervisor, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"waited {WAIT_S:.0f}s for {what}"
        supervisor.tick()
        time.sleep(0.1)


def _two_nodes(remote: RemoteInstance, tmp_path: Path, **more: Any) -> DeploymentConfig:
    """Node 0 runs the proxy; node 1 runs colocated-0, the double `remote`."""
    return DeploymentConfig.model_validate({
        "device": "cpu", "model": {"path": "tiny"}, "log_dir": str(tmp_path / "logs"), "proxy": {"port": 0},
        "security": SECURITY, "parallel": {"nodes": [{"address": "127.0.0.1"}, {"address": "127.0.0.2"}]},
        "instances": [{"role": "colocated", "node": 1, "base_port": remote.port}], **more})


def test_node0_rows_of_another_nodes_instance_follow_its_health(remote: RemoteInstance, tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _two_nodes(remote, tmp_path)
    lines: list[str] = []
    with Deployment(cfg, Console(quiet=True)) as deployment:
        assert deployment.start(ready_timeout=WAIT_S * 4)  # node 0 runs only the proxy
        row = deployment.rows["colocated-0"]
        assert row.state == "ready" and row.blocks == "3/64"
        with Supervisor(deployment, deployment.console) as supervisor:
            monkeypatch.setattr(supervisor, "_say", lines.append)
            remote.state = "loading"  # its node's launcher restarted it: the new process loads
            _until(supervisor, lambda: row.state == "loading", "the row to say loading")
            remote.state = "ready"
            _until(supervisor, lambda: row.state == "ready", "the row to say ready again")
            remote.die()
            _until(supervisor, lambda: row.state == "down", "the row of the dead instance to say down")
    url = f"http://127.0.0.2:{remote.port}"
    assert f"colocated-0 on node 1 ({url}) is no longer ready: its /health says loading; node 1's launcher " \
           "supervises it, and the proxy routes around it meanwhile" in lines, lines
    assert f"colocated-0 on node 1 ({url}) answers /health again" in lines, lines
    assert f"colocated-0 on node 1 ({url}) is no longer ready: its /health refuses connections; node 1's " \
           "launcher supervises it, and the proxy routes around it meanwhile" in lines, lines


def test_node0_stops_when_a_role_only_another_node_runs_stays_down_past_the_grace(remote: RemoteInstance,
                                                                                  tmp_path: Path) -> None:
    """Node 1's colocated-0 dies and is not back within supervision.role_down_grace_seconds: node 0 stops, naming it
    and the proxy's log. Before, node 0 left every role with an instance on another node to that node's grace."""
    cfg = _two_nodes(remote, tmp_path, supervision={"role_down_grace_seconds": 2})
    with Deployment(cfg, Console(quiet=True)) as deployment:
        assert deployment.start(ready_timeout=WAIT_S * 4)
        with Supervisor(deployment, deployment.console) as supervisor, pytest.raises(SupervisionFailed) as failed:
            remote.die()
            _until(supervisor, lambda: False, "node 0 to stop once colocated-0 was down for the grace")
    assert failed.value.message.startswith("no live colocated instance for 2s (supervision.role_down_grace_seconds: "
                                           f"2): colocated-0 down (on node 1 at http://127.0.0.2:{remote.port}; "), \
        failed.value.message
    assert failed.value.child is deployment.proxy


def test_a_server_that_took_a_remote_instances_port_reads_as_not_this_instance(
        remote: RemoteInstance, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """After node 1 restarted colocated-0, another server answers 200 at its address: the row does not say ready."""
    lines: list[str] = []
    with Deployment(_two_nodes(remote, tmp_path), Console(quiet=True)) as deployment:
        assert deployment.start(ready_timeout=WAIT_S * 4)
        row = deployment.rows["colocated-0"]
        with Supervisor(deployment, deployment.console) as supervisor:
            monkeypatch.setattr(supervisor, "_say", lines.append)
            remote.role, remote.engine_id = "decode", "node1base-decode-0"  # another deployment's instance
            _until(supervisor, lambda: row.state == "not this instance", "the row to say not this instance")
            remote.role, remote.engine_id = "colocated", "node1base-colocated-0-r1"  # node 1 restarted it
            _until(supervisor, lambda: row.state == "ready", "the row of the restarted instance to say ready")
    url = f"http://127.0.0.2:{remote.port}"
    assert f"colocated-0 on node 1 ({url}) is no longer ready: another server answers its /health, not with role " \
           "colocated and an engine_id ending in -colocated-0 (or that with -rN after a restart); check what " \
           f"listens on node 1's port {remote.port} (the proxy may still send it requests)" in lines, lines
    assert f"colocated-0 on node 1 ({url}) answers /health again" in lines, lines


def test_the_start_does_not_take_another_server_for_a_remote_instance(remote: RemoteInstance,
                                                                     tmp_path: Path) -> None:
    remote.engine_id = "elsewhere-colocated-0"  # the name matches, the base the config sets does not
    cfg = _two_nodes(remote, tmp_path, kv_transfer={"engine_id": "ours"})
    with Deployment(cfg, Console(quiet=True)) as deployment, pytest.raises(PdlaunchError) as caught:
        deployment.start(ready_timeout=2.0)
    assert deployment.rows["colocated-0"].state == "not this instance"
    assert deployment.proxy is None
    assert f"colocated-0 on node 1 (http://127.0.0.2:{remote.port}: not this instance, another server answers " \
           "its /health, not with role colocated and engine_id ours-colocated-0 (or that with -rN after a " \
           "restart))" in str(caught.value)


@pytest.mark.parametrize(("shared_base", "body", "itself"), [
    (None, {"role": "colocated", "engine_id": "0a1b-colocated-0"}, True),
    (None, {"role": "colocated", "engine_id": "0a1b-colocated-0-r12"}, True),
    (None, {"role": "colocated", "engine_id": "0a1b-colocated-1"}, False),  # another instance's
    (None, {"role": "colocated", "engine_id": "0a1b-colocated-0-r0"}, False),  # restarts count from 1
    (None, {"role": "colocated", "engine_id": "colocated-0"}, False),
    (None, {"role": "prefill", "engine_id": "0a1b-colocated-0"}, False),
    (None, {"role": "colocated"}, False),
    (None, {"status": "ok"}, False),  # any other service's /health
    ("ours", {"role": "colocated", "engine_id": "ours-colocated-0-r3"}, True),
    ("ours", {"role": "colocated", "engine_id": "theirs-colocated-0"}, False),
])
def test_which_health_answers_are_the_remote_instances(shared_base: str | None, body: dict[str, Any], itself: bool,
                                                       remote: RemoteInstance, tmp_path: Path) -> None:
    more = {"kv_transfer": {"engine_id": shared_base}} if shared_base is not None else {}
    with Deployment(_two_nodes(remote, tmp_path, **more), Console(quiet=True)) as deployment:
        plan = next(p for p in deployment.plan.instances if not p.local)
        assert deployment.answers_as_remote(plan, httpx.Response(200, json=body)) is itself
        assert health_state(httpx.Response(200, json=body), partial(deployment.answers_as_remote, plan)) == \
            ("ready" if itself else "not this instance")


@pytest.mark.parametrize(("response", "state"), [
    (httpx.Response(200, json={"status": "ok"}), "ready"),
    (httpx.Response(503, json={"status": "loading"}), "loading"),
    (httpx.Response(500, json={"status": "failed"}), "failed"),
    (httpx.Response(503, text="<html>maintenance</html>"), "unhealthy (HTTP 503)"),  # another server on its port
    (httpx.Response(404, json=["not", "an", "object"]), "unhealthy (HTTP 404)"),
    (httpx.Response(503, json={"status": "a sentence, not a state"}), "unhealthy (HTTP 503)"),
])
def test_a_health_answer_reads_as_a_row_state(response: httpx.Response, state: str) -> None:
    assert health_state(response) == state


def test_an_instance_that_accepts_but_never_answers_reads_as_stalled() -> None:
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        watch = StallWatch({"x": f"http://127.0.0.1:{silent.getsockname()[1]}/health"}, timeout_s=0.3)
        try:
            assert watch.health("x") is None
            watch.watch("x", True)
            watch.probe("x")
            assert watch.health("x") == "stalled"
            watch.watch("x", False)  # forgotten with its stall
            assert watch.health("x") is None
        finally:
            watch.stop()
