"""`render kubernetes` and the config's supervision of stalled and dead instances (review 76F): the manifests
carried none of it and render said nothing. supervision.stall_restart_seconds is now a livenessProbe of each
instance's leader container (the kubelet restarts a pod whose /health stops answering for about that long); what
Kubernetes does its own way (a group's `restart: false`, proxy.restart, max_restarts, role_down_grace_seconds,
restart_backoff_seconds) is named as left out."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.render.test_audit9_render_ignored import warnings_of
from tests.render.test_kubernetes import check_schemas
from tests.render.test_render_bad_inputs import render


def _leaders(out: Path) -> list[dict[str, Any]]:
    """The engine container of each LeaderWorkerSet's leader pods."""
    containers = []
    for path in sorted(out.glob("*.yaml")):
        manifest = yaml.safe_load(path.read_text())
        if manifest["kind"] == "LeaderWorkerSet":
            template = manifest["spec"]["leaderWorkerTemplate"]
            containers.append((template.get("leaderTemplate") or template["workerTemplate"])["spec"]["containers"][0])
    return containers


def _render(tmp_path: Path, config: str, *args: str) -> Any:
    path = tmp_path / "config.yaml"
    path.write_text(config)
    result = render(tmp_path / "out", str(path), *args)
    assert result.exit_code == 0, result.output
    return result


def test_stall_restart_seconds_is_a_liveness_probe_of_every_leader(tmp_path: Path) -> None:
    _render(tmp_path, "supervision: {stall_restart_seconds: 30}\nproxy: {health_timeout_seconds: 2.5}\n")
    leaders = _leaders(tmp_path / "out")
    assert len(leaders) == 2
    for engine in leaders:
        probe = engine["livenessProbe"]
        # each probe gives /health 2.5 s (the kubelet 1 s more, the interpreter's start); every 4 s; the pod is
        # restarted at the 9th failure in a row: 8 x 4 = 32 s (>= 30) after the first
        (http,) = [p["containerPort"] for p in engine["ports"] if p["name"] == "http"]
        command = probe["exec"]["command"]
        assert command[:2] == ["python", "-c"] and command[3:] == [str(http), "2.5"], probe
        assert (probe["timeoutSeconds"], probe["periodSeconds"], probe["failureThreshold"]) == (4, 4, 9)
        assert (probe["failureThreshold"] - 1) * probe["periodSeconds"] >= 30
        assert engine["startupProbe"]["exec"] == probe["exec"]
    for path in sorted((tmp_path / "out").glob("*.yaml")):
        check_schemas(yaml.safe_load(path.read_text()))


def test_without_stall_restart_seconds_there_is_no_liveness_probe(tmp_path: Path) -> None:
    _render(tmp_path, "model: {path: tiny}\n")
    assert [e.get("livenessProbe") for e in _leaders(tmp_path / "out")] == [None, None]


@pytest.mark.parametrize(("config", "field", "says"), [
    ("instances: [{role: prefill}, {role: decode, restart: false}]\n", "instances[1].restart",
     "false has no effect on the manifests: LWS recreates a dead instance's pods"),
    ("proxy: {restart: false}\n", "proxy.restart",
     "false has no effect on the manifests: the proxy's Deployment restarts its pod"),
    ("supervision: {max_restarts: 2}\n", "supervision.max_restarts",
     "2 has no effect on the manifests: the kubelet restarts a failing container without limit"),
    ("supervision: {role_down_grace_seconds: 60}\n", "supervision.role_down_grace_seconds",
     "60 has no effect on the manifests: nothing stops the deployment when a role is down"),
    ("supervision: {restart_backoff_seconds: 5}\n", "supervision.restart_backoff_seconds",
     "5 has no effect on the manifests: the kubelet waits 10 s before restarting a failed container"),
])
def test_supervision_kubernetes_does_its_own_way_is_named_as_left_out(tmp_path: Path, config: str, field: str,
                                                                      says: str) -> None:
    result = _render(tmp_path, config)
    found = warnings_of(result.output)
    assert len(found) == 1 and found[0].startswith(f"warning: {field}: {says}"), result.output


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(503)  # a loading or sleeping instance: alive, so not a stall
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return


@pytest.fixture
def answering() -> Iterator[int]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def _probe(tmp_path: Path, port: int) -> subprocess.CompletedProcess[str]:
    """The rendered probe's command, run as the kubelet runs it in the pod (POD_IP set)."""
    _render(tmp_path, "supervision: {stall_restart_seconds: 30}\nproxy: {health_timeout_seconds: 1}\n")
    command = _leaders(tmp_path / "out")[0]["livenessProbe"]["exec"]["command"]
    command = [sys.executable, *command[1:3], str(port), *command[4:]]
    return subprocess.run(command, env={**os.environ, "POD_IP": "127.0.0.1"}, capture_output=True, text=True,
                          timeout=30, check=False)


def test_the_probe_passes_on_any_answer_of_health(tmp_path: Path, answering: int) -> None:
    assert _probe(tmp_path, answering).returncode == 0


def test_the_probe_fails_when_health_does_not_answer_within_its_timeout(tmp_path: Path) -> None:
    with socket.socket() as listening:  # accepts connections (the kernel's backlog) and never answers: stalled
        listening.bind(("127.0.0.1", 0))
        listening.listen(8)
        done = _probe(tmp_path, listening.getsockname()[1])
    assert done.returncode != 0 and "timed out" in done.stderr, done
