"""`pdlaunch serve --backend ray` whose connection to an instance's rank-0 actor breaks while it serves (a network blip:
the launcher's TCP connections to the actor's worker destroyed with `ss -K`, the actor itself untouched), on a real Ray
head of its own on this machine (tests/cluster/ray_cluster.py).

Ray fails the instance's running `serve` call with ActorUnavailableError ("The actor is temporarily unavailable:
RpcError ..."), the GCS still having the actor alive. Before, the launcher took that for the actor's death: it killed
the instance's actors and placed it again (`restart 1`). Now the instance is kept, its actor asked again, which
answers over a new connection: it keeps serving, its end watched through RayInstance.served, which a Ctrl-C then
returns through (a clean stop, exit 0).
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.cluster.ray_cluster import RayCluster, RayHead, RayUnavailable
from tests.cluster.ray_serve import ray_serve
from tests.cluster.running import running
from tests.serving.helpers import wait_for

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

START_TIMEOUT_S = 300.0  # Ray actors importing torch and building engines on a loaded 2-core machine
NODE_RESOURCE = "pd_unreachable"
RANK0_PID = re.compile(r"prefill-0: rank 0 actor on \S+ \(pid (\d+)\)")


@pytest.fixture(scope="module")
def head() -> Iterator[RayCluster]:
    yield from running(RayHead("--resources", json.dumps({NODE_RESOURCE: 2})), RayUnavailable, "a Ray head")


def _ss(*args: str) -> str:
    return subprocess.run(["ss", *args], capture_output=True, text=True, check=True, timeout=30).stdout


def _listening_ports(pid: int) -> set[int]:
    return {int(line.split()[3].rsplit(":", 1)[1]) for line in _ss("-tlnpH").splitlines() if f"pid={pid}," in line}


def _connections(pid: int, ports: set[int]) -> list[tuple[str, str]]:
    """(local, peer) of `pid`'s established TCP connections to one of `ports`."""
    found = []
    for line in _ss("-tnpH", "state", "established").splitlines():
        fields = line.split()
        if f"pid={pid}," in line and int(fields[3].rsplit(":", 1)[1]) in ports:
            found.append((fields[2], fields[3]))
    return found


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_a_broken_connection_to_a_live_actor_does_not_restart_its_instance(head: RayCluster, llama_ckpt: Path,
                                                                          tmp_path: Path) -> None:
    if subprocess.run(["ss", "-V"], capture_output=True).returncode != 0:
        pytest.skip("needs `ss` (iproute2) to destroy the launcher's connections")
    with ray_serve(head, llama_ckpt, tmp_path, NODE_RESOURCE) as serve:
        proc, output, said = serve.proc, serve.output, serve.said
        wait_for(lambda: said("ready: OpenAI API at"), "the ray deployment to be ready", START_TIMEOUT_S, poll=1.0)
        found = RANK0_PID.search((serve.logs / "prefill-0.log").read_text(errors="replace"))
        assert found is not None, "prefill-0's log does not name its rank-0 actor's pid"
        actor = int(found.group(1))
        ports = _listening_ports(actor)
        links = _connections(proc.pid, ports)
        assert links, f"no connection of the launcher (pid {proc.pid}) to its actor's ports {ports}"
        for local, peer in links:  # the blip: the launcher's connections to the actor, destroyed
            _ss("-K", "-tn", "src", local, "dst", peer)

        def unreachable_said() -> bool:
            assert "lost its Ray actor" not in output(), f"prefill-0 was ended as dead:\n{output()}"
            return said("prefill-0: its Ray actor on node")

        wait_for(unreachable_said, "the launcher to say prefill-0's actor does not answer", 60.0, poll=0.5)
        wait_for(lambda: said("answers again after"), "prefill-0's actor to answer again", 60.0, poll=0.5)
        text = " ".join(output().split())
        assert "temporarily unavailable" in text, text
        assert "restart 1" not in text and "lost its Ray actor" not in text, text
        url = re.search(r"prefill-0 is ready at (\S+)", text)
        assert url is not None, text
        assert httpx.get(f"{url.group(1)}/health", timeout=10.0, trust_env=False).status_code == 200

        proc.send_signal(signal.SIGINT)  # a clean stop: the new watch on prefill-0's end returns with it
        assert proc.wait(120) == 0, output()
        text = " ".join(output().split())
        assert "stopped: every actor and placement group removed" in text and "Traceback" not in text, text
        assert "restart 1" not in text, text
