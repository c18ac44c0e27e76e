"""`--backend ray` watches its proxy for stalls as the local supervisor does (launcher/supervisor.py): a ready proxy
that is alive but whose /health does not answer within proxy.health_timeout_seconds (here: SIGSTOPped) is said to be
stalled, and once stalled for supervision.stall_restart_seconds it is killed and restarted after the backoff, under
the proxy's restart policy, each step in the output and the restart in its log. Before, the Ray launcher probed only
the instances: a stopped proxy stayed "live", every client waited, and nothing was said. The proxy's process is a
real one (a small HTTP server standing in for the proxy); stand-ins for the ray module."""

from __future__ import annotations

import io
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rich.console import Console

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.config.deployment_config import DeploymentConfig  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends import ray_deployment, ray_proxy  # noqa: E402
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from tests.cluster.test_backend_failures_ray import NODES, FakeRay  # noqa: E402

WAIT_S = 60.0  # for a stall to be seen and the restart to answer, on a loaded machine (it takes 3-4 s)
# The proxy's stand-in: answers every GET with 200 at HOST:PORT (its argv), as the proxy's /health does.
PROXY = """
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
class Health(BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
ThreadingHTTPServer((sys.argv[1], int(sys.argv[2])), Health).serve_forever()
"""


@pytest.fixture
def serving(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[RayDeployment,
                                                                                          list[str]]]]:
    """`serving(supervision)`: every instance ready (where nothing listens: refused, not stalled) and the proxy's
    stand-in started and answering; returns the deployment and what it said."""
    made: list[RayDeployment] = []

    def build(supervision: dict[str, float]) -> tuple[RayDeployment, list[str]]:
        cfg = DeploymentConfig.model_validate({
            "device": "cpu", "launcher": {"backend": "ray"}, "log_dir": str(tmp_path / "logs"),
            "proxy": {"port": 0, "health_timeout_seconds": 0.5}, "supervision": supervision,
            "instances": [{"role": "colocated", "tp": 1}]})
        monkeypatch.setattr(ray_deployment, "connect", lambda cfg: FakeRay())
        monkeypatch.setattr(ray_deployment, "live_nodes", lambda ray_module: NODES)
        monkeypatch.setattr(ray_proxy, "proxy_argv", lambda cfg, host, port, *rest: [sys.executable, "-c", PROXY,
                                                                                    host, str(port)])
        deployment = RayDeployment(cfg, Console(file=io.StringIO()))
        made.append(deployment)
        said: list[str] = []
        monkeypatch.setattr(deployment, "say", said.append)
        for run in deployment.runs:
            run.spec = run.plan.spec.model_copy(update={"host": "127.0.0.1"})
            run.state = "ready"
        deployment.proxy.start(deployment.runs, note=None)
        assert deployment.proxy.wait_ready(time.monotonic() + WAIT_S, lambda: False)
        return deployment, said

    yield build
    for deployment in made:
        deployment.stop(drain=False)


def _tick_until(deployment: RayDeployment, done: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{what} within {WAIT_S:.0f}s"
        deployment.tick()
        time.sleep(0.05)


def test_a_stopped_proxy_is_killed_and_restarted_after_stall_restart_seconds(serving) -> None:  # type: ignore[no-untyped-def]
    deployment, said = serving({"stall_restart_seconds": 1.0, "restart_backoff_seconds": 0.5})
    proxy = deployment.proxy
    assert proxy.process is not None and proxy.process.pid is not None
    stopped = proxy.process.pid
    url = deployment.plan.proxy_url
    os.kill(stopped, signal.SIGSTOP)
    _tick_until(deployment, lambda: proxy.record.restarts == 1 and proxy.record.ready,
                "the stopped proxy was not restarted and answering")
    assert proxy.process.pid != stopped and proxy.process.poll() is None
    assert proxy.record.last_exit.startswith("was stalled for "), proxy.record.last_exit
    assert proxy.record.last_exit.endswith("(no /health answer; supervision.stall_restart_seconds: 1) and killed to "
                                           "restart it"), proxy.record.last_exit
    assert (f"the proxy (pid {stopped}) is stalled: alive, but /health at {url} has not answered within 0.5s "
            "(stopped, hung or swapping?); clients wait; it is restarted after supervision.stall_restart_seconds: 1s"
            in said), said
    assert any(line.startswith(f"the proxy (pid {stopped}) was stalled for ") and "killing it to restart it" in line
               for line in said), said
    assert any(line.startswith("the proxy was stalled for ") and "restarting it in 0.5s" in line for line in said), said
    assert "===== pdlaunch: restart 1 of the proxy (was stalled for " in proxy.process.log_path.read_text()
    # the restarted proxy is watched afresh: it answers, so nothing more is said of a stall
    count = len(said)
    for _ in range(40):
        deployment.tick()
        time.sleep(0.05)
    assert not any("stalled" in line for line in said[count:]), said[count:]


def test_a_stopped_proxy_is_left_running_when_stall_restart_seconds_is_unset(serving) -> None:  # type: ignore[no-untyped-def]
    deployment, said = serving({})
    proxy = deployment.proxy
    assert proxy.process is not None and proxy.process.pid is not None
    pid = proxy.process.pid
    proxy.process.signal_group(signal.SIGSTOP)
    _tick_until(deployment, lambda: any("is stalled" in line for line in said), "the proxy's stall was not said")
    assert any(line.startswith(f"the proxy (pid {pid}) is stalled") and line.endswith(
        "it is left running (supervision.stall_restart_seconds is unset)") for line in said), said
    proxy.process.signal_group(signal.SIGCONT)
    _tick_until(deployment, lambda: f"the proxy (pid {pid}) answers /health again; no longer stalled" in said,
                "the proxy's answer after SIGCONT was not said")
    assert proxy.process.pid == pid and proxy.record.restarts == 0 and proxy.live
