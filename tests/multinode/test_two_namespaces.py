"""Multi-node PD on one machine: node 0 (proxy + prefill) and node 1 (decode) in two network
namespaces joined by a veth pair, each started by its own `pdlaunch serve CONFIG --node-rank K`.

UCX_TLS=tcp: both namespaces share one kernel, so by default UCX sees the peer as intra-node and
reads the KV through process memory (cma) while only its control traffic crosses the veth. Real nodes
share no memory; with tcp alone the KV bytes must cross the veth, which the test checks on its counters.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import httpx
import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.multinode.netns import NamespacesUnavailable, TwoNodes, call_in_namespace
from tests.serving.helpers import wait_for

pytestmark = pytest.mark.e2e

START_TIMEOUT_S = 240.0  # two launchers importing torch and building engines on a shared 2-core box
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
PROXY_PORT, PREFILL_PORT, DECODE_PORT, SIDE_CHANNEL_PORT = 8000, 8100, 8200, 5600
NUM_BLOCKS = 128
MAX_TOKENS = 8
PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(23)], [(11 * i + 5) % 500 + 3 for i in range(40)]]


@pytest.fixture
def nodes() -> Iterator[TwoNodes]:
    two = TwoNodes()
    try:
        two.create()
    except NamespacesUnavailable as e:
        pytest.skip(f"needs two network namespaces: {e}")
    try:
        yield two
    finally:
        two.delete()


def write_config(directory: Path, model: Path, nodes: TwoNodes) -> Path:
    a, b = nodes.addresses
    path = directory / "two-nodes.yaml"
    path.write_text(f"""\
device: cpu
model: {{path: "{model}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
parallel:
  nodes: [{{address: {a}}}, {{address: {b}}}]
  master_addr: {a}
kv_transfer:
  connector: nixl
  side_channel_host: 0.0.0.0
  side_channel_port: {SIDE_CHANNEL_PORT}
proxy: {{host: {a}, port: {PROXY_PORT}}}
instances:
  - {{role: prefill, count: 1, node: 0, base_port: {PREFILL_PORT}}}
  - {{role: decode, count: 1, node: 1, base_port: {DECODE_PORT}}}
""")
    return path


class NodeLauncher:
    """`pdlaunch serve CONFIG --node-rank K` inside node K's namespace, output in a file."""

    def __init__(self, nodes: TwoNodes, rank: int, config: Path, tmp: Path) -> None:
        self.rank = rank
        self.output_path = tmp / f"node{rank}.out"
        argv = [sys.executable, "-m", "pdlaunch", "serve", str(config), "--node-rank", str(rank),
                "--log-dir", str(tmp / f"logs-node{rank}")]
        env = {**os.environ, "UCX_TLS": "tcp", "OMP_NUM_THREADS": "1"}
        self._out = open(self.output_path, "wb")
        # `ip netns exec` execs the command: this pid is the launcher's.
        self.proc = subprocess.Popen(nodes.exec_argv(rank, argv), stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def check_alive(self) -> None:
        assert self.proc.poll() is None, f"node {self.rank}'s launcher exited with {self.proc.returncode}:\n{self.output}"

    def interrupt(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)

    def wait(self) -> int | None:
        """The exit code, or None when it had to be killed after STOP_TIMEOUT_S."""
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            return None
        finally:
            self._out.close()


def kv_bytes_received(client: httpx.Client, url: str) -> float:
    for line in client.get(f"{url}/metrics").text.splitlines():
        if line.startswith("pdlaunch_kv_transfer_bytes_total "):
            return float(line.split()[1])
    return 0.0


def completion(client: httpx.Client, url: str, model: Path, prompt: list[int], **extra: Any) -> dict[str, Any]:
    body = {"model": str(model), "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    response = client.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def test_pd_request_across_two_namespaces(nodes: TwoNodes, llama_ckpt: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, llama_ckpt, nodes)
    node_a, node_b = nodes.addresses
    proxy = f"http://{node_a}:{PROXY_PORT}"
    prefill, decode = f"http://{node_a}:{PREFILL_PORT}", f"http://{node_b}:{DECODE_PORT}"
    launchers = [NodeLauncher(nodes, 1, config, tmp_path), NodeLauncher(nodes, 0, config, tmp_path)]
    try:
        def ready() -> bool:
            for launcher in launchers:
                launcher.check_alive()
            try:
                return httpx.get(f"{proxy}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        call_in_namespace(nodes.namespaces[0], lambda: wait_for(ready, "the proxy on node 0 to see both nodes "
                                                                "ready", START_TIMEOUT_S, poll=0.5),
                          START_TIMEOUT_S + 10)

        def requests_from_node_a() -> dict[str, Any]:
            with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
                kv_before, rx_before = kv_bytes_received(client, decode), nodes.rx_bytes(1)
                through_proxy = completion(client, proxy, llama_ckpt, PROMPTS[0])
                kv_after, rx_after = kv_bytes_received(client, decode), nodes.rx_bytes(1)
                # The proxy's two legs by hand, to see what prefill advertises to decode.
                prefill_leg = completion(client, prefill, llama_ckpt, PROMPTS[1], max_tokens=1,
                                         kv_transfer_params={"do_remote_decode": True})
                decode_leg = completion(client, decode, llama_ckpt, PROMPTS[1],
                                        kv_transfer_params=prefill_leg["kv_transfer_params"])
                return {"proxy": through_proxy, "kv": kv_after - kv_before, "rx": rx_after - rx_before,
                        "params": prefill_leg["kv_transfer_params"], "by_hand": decode_leg,
                        "decode_info": client.get(f"{decode}/info").json()}

        seen = call_in_namespace(nodes.namespaces[0], requests_from_node_a, 2 * REQUEST_TIMEOUT_S + 30)

        assert seen["kv"] > 0, "the decode instance on node 1 received no KV over NIXL"
        assert seen["rx"] >= seen["kv"], (f"node 1's veth received {seen['rx']} bytes while {seen['kv']} KV bytes "
                                          "arrived: the KV did not cross between the nodes' network stacks")
        assert seen["params"]["remote_host"] == node_a and seen["params"]["remote_port"] == SIDE_CHANNEL_PORT
        assert seen["decode_info"]["num_pending_requests"] == 0

        with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as colocated:
            reference = colocated.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                   ignore_eos=True))
        assert seen["proxy"]["choices"][0]["token_ids"] == reference[0].token_ids
        assert seen["by_hand"]["choices"][0]["token_ids"] == reference[1].token_ids
    finally:
        for launcher in launchers:
            launcher.interrupt()
        codes = [launcher.wait() for launcher in launchers]
    left = nodes.pids()
    node1, node0 = launchers
    assert codes == [0, 0], f"exit codes (node 1, node 0) {codes}:\n{node1.output}\n{node0.output}"
    assert not left, f"processes left in the namespaces after both launchers stopped: {left}"
    assert "the proxy runs on node 0" in node1.output
    assert all("stopped: all processes reaped" in launcher.output for launcher in launchers)
