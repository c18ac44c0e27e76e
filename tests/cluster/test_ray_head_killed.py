"""`pdlaunch serve --backend ray` whose cluster's head is SIGKILLed while it serves, on a real Ray head of its own on
this machine (tests/cluster/ray_cluster.py; one node: the actors die with it, before the launcher's head watch has
seen the GCS refuse for ray_head.LOST_S).

Before, the launcher saw an actor dead and went to remove its placement group, a Ray call that blocked on the dead
GCS until Ray ended the process 60 s later with its own fatal line ("Failed to connect to GCS within 60 seconds",
exit 1): the pdlaunch error naming --ray-address and the head never came. Now the launcher does not call Ray while
the head does not answer: it stops the deployment (its proxy reaped) with the head-gone error, exit 1, well within
Ray's 60 s.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.cluster.ray_cluster import RayCluster, RayHead, RayUnavailable
from tests.cluster.ray_serve import ray_serve
from tests.cluster.running import running
from tests.helpers.pids import signal_pid
from tests.serving.helpers import wait_for

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray as backend  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends import ray_head  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, node_died, ray_cfg  # noqa: E402

START_TIMEOUT_S = 300.0  # Ray actors importing torch and building engines on a loaded 2-core machine
# Ray's own end of a driver whose GCS is gone comes 60 s after it (gcs_rpc_server_reconnect_timeout_s); the launcher's
# head watch declares it lost after ray_head.LOST_S (15 s) of refused connections
EXIT_BOUND_S = 45.0
NODE_RESOURCE = "pd_head_killed"


@pytest.fixture(scope="module")
def head() -> Iterator[RayCluster]:
    """A head of this module's own (the test kills it): room for a prefill and a decode of TP 1."""
    yield from running(RayHead("--resources", json.dumps({NODE_RESOURCE: 2})), RayUnavailable, "a Ray head")


def _head_processes(head: RayCluster) -> list[int]:
    """The head's GCS server, raylet and every other process of this cluster (those naming its directory), and
    their children (the actors' workers)."""
    mine = {pid for pid, (_, args) in head._processes().items() if str(head.root) in args}
    return sorted(head._tree(mine))


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_killed_head_stops_serve_with_our_error_before_ray_ends_it(head: RayCluster, llama_ckpt: Path,
                                                                      tmp_path: Path) -> None:
    with ray_serve(head, llama_ckpt, tmp_path, NODE_RESOURCE) as serve:
        wait_for(lambda: serve.said("ready: OpenAI API at"), "the ray deployment to be ready", START_TIMEOUT_S,
                 poll=1.0)
        proxy_pids = [pid for pid, (ppid, args) in head._processes().items()
                      if ppid == serve.proc.pid and f"--port {serve.proxy_port}" in args]
        assert len(proxy_pids) == 1, "the proxy, the launcher's child, was not found"

        killed = time.monotonic()
        for pid in _head_processes(head):  # the head's GCS, raylet and the actors' workers, at once
            signal_pid(pid, signal.SIGKILL)
        try:
            code = serve.proc.wait(EXIT_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"pdlaunch serve still runs {EXIT_BOUND_S:.0f}s after its head was killed:\n{serve.output()}")
        took = time.monotonic() - killed
        text = " ".join(serve.output().split())
        assert code == 1, text
        # the GCS's address as Ray reports it: the head at the machine's own address, on the port the test gave it
        assert re.search(rf"--ray-address: the Ray cluster's head is gone: its GCS at \S+:{head.port} ", text), text
        assert "start the cluster again" in text, text
        assert "Traceback" not in text and "Failed to connect to GCS" not in text, text
        assert took < EXIT_BOUND_S, took
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in proxy_pids), "the proxy to be reaped",
                 30.0, poll=0.2)
        assert not head.processes(f"--port {serve.proxy_port} "), "the proxy was left running"


@pytest.fixture
def closed_address() -> str:
    """HOST:PORT where nothing listens (a head whose GCS died)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"127.0.0.1:{s.getsockname()[1]}"


@pytest.mark.timeout(60)
def test_an_actor_dead_with_its_head_is_not_removed_through_ray(closed_address: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The actors died with the head and are seen dead before the head watch's grace: removing them (a Ray call to
    the GCS: FakeRay's remove_placement_group fails the test) blocked until Ray ended the launcher. Now the instance
    is left as it is, said once, and the head watch's error stops the deployment."""
    monkeypatch.setattr(ray_head, "LOST_S", 0.3)
    fake = FakeRay(gcs_address=closed_address)
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    for run in deployment.runs:
        run.state, run.serve_ref, run.pg = "ready", f"serve-{run.name}", object()  # type: ignore[assignment]
        fake.failures[f"serve-{run.name}"] = node_died()
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    monkeypatch.setattr(type(deployment), "start", lambda self, should_stop: True)
    monkeypatch.setattr(backend, "POLL_S", 0.01)

    assert backend.run_ray(ray_cfg(tmp_path)) == 1
    text = " ".join(capsys.readouterr().out.split())
    for run in deployment.runs:
        held = [s for s in said if s.startswith(f"{run.name} lost its Ray actor")]
        assert len(held) == 1, said
        assert f"the Ray cluster's head does not answer (its GCS at {closed_address}): nothing is removed" in held[0]
    assert f"launcher.ray_address: the Ray cluster's head is gone: its GCS at {closed_address}" in text, text
    assert not any("restart 1" in s for s in said) and "Traceback" not in text, (said, text)
    assert "kill" not in fake.calls and fake.calls[-1] == "shutdown", fake.calls


def test_an_actor_dead_while_its_head_answers_is_removed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The GCS accepts connections: the dead instance's actors are killed and its placement group removed at once,
    and its restart planned, as before."""
    removed: list[object] = []
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        fake = FakeRay(gcs_address=f"127.0.0.1:{listening.getsockname()[1]}")
        fake.util.remove_placement_group = removed.append
        deployment = deployment_on(fake, tmp_path, monkeypatch)
        said: list[str] = []
        monkeypatch.setattr(deployment, "say", said.append)
        run = deployment.runs[0]
        pg = object()
        run.state, run.serve_ref, run.pg = "ready", "serve", pg  # type: ignore[assignment]
        fake.failures["serve"] = node_died()
        try:
            deployment.tick()
        finally:
            deployment.stop(drain=False, hurry=lambda: True)
    assert run.state == "down" and removed[0] is pg, said
    assert any(s.startswith("prefill-0 lost its Ray actor") and "restart 1 in" in s for s in said), said
