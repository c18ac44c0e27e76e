"""`--backend ray` on a real Ray cluster of three raylets on this machine (tests/cluster/ray_cluster.py):
the head (resource pd_prefill) and two workers at 127.0.0.2 / 127.0.0.3 (resource pd_decode each).

One deployment, 1P1D with a TP 2 decode, served through `pdlaunch serve --backend ray`; in order: its
answers equal a colocated engine's and the KV crossed from prefill to decode; each instance's /info names
the node every rank ran on (the prefill on the head, both decode ranks on one worker); a second
deployment whose prefill cannot be placed (the first holds the head's pd_prefill) fails within its
placement timeout naming what it asked for; killing the raylet holding the decode restarts the decode on
the other worker with a new engine_id (ended as soon as the dead raylet refuses a connection), and the service
answers again; so does killing the decode's rank 1
actor (rank 0's watchdog names it); after SIGINT no actor, placement
group or process of the deployment is left. One cluster serves every step (Ray starts slowly)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.cluster.ray_cluster import HEAD_RESOURCE, WORKERS, RayCluster, running_ray
from tests.helpers.ports import free_ports
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS, completion, kv_bytes_received
from tests.serving.helpers import wait_for

ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

START_TIMEOUT_S = 300.0  # Ray actors importing torch and building engines on a loaded 2-core machine
RESTART_TIMEOUT_S = 240.0  # Ray marks the killed node dead, then the decode is placed and built again
STOP_TIMEOUT_S = 90.0
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def cluster() -> Iterator[RayCluster]:
    yield from running_ray()


class Serve:
    """`pdlaunch serve CONFIG` (the ray backend), output in a file."""

    def __init__(self, config: Path, out: Path, env: dict[str, str]) -> None:
        self.out = out
        self._file = open(out, "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "pdlaunch", "serve", str(config)], stdout=self._file,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)

    @property
    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def alive(self) -> bool:
        assert self.proc.poll() is None, f"pdlaunch serve exited with {self.proc.returncode}:\n{self.output}"
        return True

    def stop(self) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None
        finally:
            self._file.close()


def _config(path: Path, cluster: RayCluster, ckpt: Path, logs: Path, proxy_port: int, prefill_port: int,
            decode_port: int, timeout_s: float = 120.0) -> Path:
    path.write_text(f"""\
launcher:
  backend: ray
  ray_address: "{cluster.address}"
  ray_placement_timeout_seconds: {timeout_s}
  ray_resources: {{prefill: {{{HEAD_RESOURCE}: 1}}, decode: {{pd_decode: 0.01}}}}
device: cpu
model: {{path: "{ckpt}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
kv_transfer: {{connector: nixl}}
proxy: {{host: 127.0.0.1, port: {proxy_port}}}
supervision: {{restart_backoff_seconds: 0.5}}
log_dir: {logs}
instances:
  - {{role: prefill, count: 1, tp: 1, base_port: {prefill_port}}}
  - {{role: decode, count: 1, tp: 2, base_port: {decode_port}}}
""")
    return path


def _info(client: httpx.Client, url: str) -> dict[str, Any]:
    response = client.get(f"{url}/info")
    assert response.status_code == 200, response.text
    info: dict[str, Any] = response.json()
    return info


def _answers(client: httpx.Client, proxy: str, ckpt: Path) -> list[list[int]]:
    return [completion(client, proxy, ckpt, prompt, MAX_TOKENS)["choices"][0]["token_ids"] for prompt in PROMPTS]


def _answers_again(client: httpx.Client, proxy: str, ckpt: Path) -> list[list[int]] | None:
    try:
        return _answers(client, proxy, ckpt)
    except (AssertionError, httpx.HTTPError):
        return None


@pytest.mark.e2e
@pytest.mark.slow
@pytest.mark.timeout(900)
def test_ray_backend_serves_restarts_and_cleans_up(cluster: RayCluster, llama_ckpt: Path, tmp_path: Path) -> None:
    proxy_port, prefill_port, decode_port = free_ports(3)
    config = _config(tmp_path / "pd.yaml", cluster, llama_ckpt, tmp_path / "logs", proxy_port, prefill_port,
                     decode_port)
    env = {k: v for k, v in cluster.env.items() if k != "UCX_NET_DEVICES"}
    env["OMP_NUM_THREADS"] = "1"
    proxy = f"http://127.0.0.1:{proxy_port}"
    heads = [a for a in cluster.nodes() if a not in WORKERS]
    assert len(heads) == 1 and len({*heads, *WORKERS}) == 3, "three raylets on distinct node addresses"
    head = heads[0]

    serve = Serve(config, tmp_path / "serve.out", env)
    try:
        with httpx.Client(timeout=60, trust_env=False) as client:
            def ready() -> bool:
                serve.alive()
                try:
                    return client.get(f"{proxy}/health", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(ready, "the proxy of the ray deployment", START_TIMEOUT_S, poll=1.0)
            answers = _answers(client, proxy, llama_ckpt)
            prefill = _info(client, f"http://{head}:{prefill_port}")
            decode_node = next(a for a in WORKERS if _up(client, f"http://{a}:{decode_port}"))
            decode_url = f"http://{decode_node}:{decode_port}"
            decode = _info(client, decode_url)
            moved = kv_bytes_received(client, decode_url)

            # A deployment Ray cannot place (the head's only pd_prefill is held) fails within its timeout.
            blocked = _config(tmp_path / "blocked.yaml", cluster, llama_ckpt, tmp_path / "logs2",
                              *free_ports(3), timeout_s=3)
            done = subprocess.run([sys.executable, "-m", "pdlaunch", "serve", str(blocked)], env=env,
                                  capture_output=True, text=True, timeout=180)
            assert done.returncode == 1, done.stdout + done.stderr
            said = done.stdout + done.stderr
            assert "could not place prefill-0's placement group within 3s" in said, said
            assert HEAD_RESOURCE in said and "Traceback" not in said, said

            # The node holding the decode dies: the decode comes back on the other worker.
            cluster.kill_node(decode_node)
            other = next(a for a in WORKERS if a != decode_node)
            wait_for(lambda: serve.alive() and _up(client, f"http://{other}:{decode_port}"),
                     f"the decode restarted on {other}", RESTART_TIMEOUT_S, poll=1.0)
            again = wait_for(lambda: _answers_again(client, proxy, llama_ckpt), "answers after the restart",
                             RESTART_TIMEOUT_S, poll=1.0)
            restarted = _info(client, f"http://{other}:{decode_port}")

            # A dead actor (the decode's rank 1): rank 0's watchdog names it, the decode restarts again.
            assert cluster.kill_processes("ray::RayRank") == 1
            wait_for(lambda: serve.alive() and _engine_id(client, f"http://{other}:{decode_port}").endswith("-r2"),
                     "the decode restarted after its rank 1 actor died", RESTART_TIMEOUT_S, poll=1.0)
            after_actor = wait_for(lambda: _answers_again(client, proxy, llama_ckpt),
                                   "answers after the rank actor's death", RESTART_TIMEOUT_S, poll=1.0)
    finally:
        code = serve.stop()

    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as colocated:
        reference = colocated.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    expected = [r.token_ids for r in reference]
    assert answers == expected and again == expected and after_actor == expected
    assert moved > 0, "the decode received no KV from the prefill (it recomputed)"
    assert prefill["role"] == "prefill" and prefill["rank_nodes"] == [head]
    assert decode["tp_size"] == 2 and decode["rank_nodes"] == [decode_node, decode_node]
    assert restarted["rank_nodes"] == [other, other]
    assert restarted["engine_id"] != decode["engine_id"] and restarted["engine_id"].endswith("-r1")
    text = serve.output
    assert code == 0, text
    assert "moved to" in text and "stopped: every actor and placement group removed" in text, text
    # kill_node SIGKILLs the decode node's raylet (its host stays up): Ray mostly reports the decode's actor
    # unavailable first, and the decode is ended as soon as that raylet refuses a connection, not after the grace a
    # blip gets. On a loaded machine Ray's GCS may declare the node dead (its health checks) before any such report
    # (CI, 2026-11-30: "The actor died because its node has died", no unavailable line): Ray's word ends it then.
    gone = re.search(rf"decode-0 lost its Ray actor on node {re.escape(decode_node)}: its raylet at "
                     rf"{re.escape(decode_node)}:\d+ refuses connections: the node is gone \(Ray: ", text)
    died = "decode-0 lost its Ray actor (The actor died because its node has died" in text
    assert gone is not None or died, text
    assert "has been unreachable for" not in text, text
    # the deaths are said in the launcher's own lines, not beside Ray's paragraph for each; the rank actor's SIGKILL
    # (rank 0 exits with code 1) is named as one from outside
    assert "A worker died or was killed" not in text and "Unhandled error" not in text, text
    assert "decode-0 exited with code 1 (its TP rank 1 actor ended by a SIGKILL pdlaunch did not send: most often " \
           "the kernel's OOM killer on node " in text, text
    assert "TP rank 1 (Ray actor on" in (tmp_path / "logs" / "decode-0.log").read_text(errors="replace")

    left = cluster.query(
        "from ray.util import placement_group_table\n"
        "out = {'groups': [g['name'] for g in placement_group_table().values() if g['state'] != 'REMOVED' "
        "and g['name'].startswith('pdlaunch-')], 'actors': ray.util.list_named_actors(all_namespaces=True)}")
    assert left == {"groups": [], "actors": []}, left
    wait_for(lambda: not cluster.processes("ray::RayInstance") and not cluster.processes("ray::RayRank"),
             "the deployment's actor processes to exit", 30.0, poll=0.5)
    assert not cluster.processes(str(tmp_path)), cluster.processes(str(tmp_path))


def _engine_id(client: httpx.Client, url: str) -> str:
    try:
        return str(client.get(f"{url}/info", timeout=5).json()["engine_id"])
    except (httpx.HTTPError, ValueError, KeyError):
        return ""


def _up(client: httpx.Client, url: str) -> bool:
    try:
        return client.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.mark.e2e
def test_resources_no_node_has_are_named_at_start(cluster: RayCluster, tmp_path: Path) -> None:
    config = tmp_path / "pinned.yaml"
    config.write_text(f"launcher: {{backend: ray, ray_address: '{cluster.address}', "
                      "ray_resources: {decode: {pd_a100: 0.5}}}\ndevice: cpu\nmodel: {path: tiny}\n")
    done = subprocess.run([sys.executable, "-m", "pdlaunch", "check-config", str(config)], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    said = done.stdout + done.stderr
    assert "launcher.ray_resources.decode" in said and "pd_a100" in said and "Traceback" not in said, said


@pytest.mark.e2e
def test_a_deployment_larger_than_the_cluster_is_refused_by_check_config(cluster: RayCluster, tmp_path: Path) -> None:
    """Four one-CPU prefills and two decodes of TP 2: 8 CPUs of bundles on three nodes of 2 CPUs. Each instance
    alone fits; check-config adds them up and refuses the deployment, where serve waited out its placement timeout."""
    config = tmp_path / "big.yaml"
    config.write_text(f"launcher: {{backend: ray, ray_address: '{cluster.address}'}}\ndevice: cpu\n"
                      "model: {path: tiny}\ninstances:\n  - {role: prefill, count: 4, tp: 1}\n"
                      "  - {role: decode, count: 2, tp: 2}\n")
    done = subprocess.run([sys.executable, "-m", "pdlaunch", "check-config", str(config)], env=cluster.env,
                          capture_output=True, text=True, timeout=120)
    said = done.stdout + done.stderr
    assert done.returncode == 1, said
    assert "instances: the deployment's instances need {CPU: 8} in all" in said, said
    # the cluster's nodes (2 CPUs each): 6 CPUs with all three up, fewer while an earlier test's node restarts
    total = re.search(r"and the cluster has \{CPU: (\d+)\} in all: it can never be placed", said)
    assert total is not None and int(total.group(1)) < 8 and "Traceback" not in said, said
