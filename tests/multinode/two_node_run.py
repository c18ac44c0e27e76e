"""Run a deployment on two namespace "nodes" (one `pdlaunch serve --node-rank K` each) and send it
PD requests from node 0: through the proxy, and the proxy's two legs by hand (to see the params)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.multinode.netns import TwoNodes, call_in_namespace
from tests.serving.helpers import wait_for

START_TIMEOUT_S = 240.0  # two launchers importing torch and building engines on a shared 2-core box
REQUEST_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
NUM_BLOCKS = 128
PROMPTS = [[(7 * i + 3) % 500 + 3 for i in range(23)], [(11 * i + 5) % 500 + 3 for i in range(40)]]


class NodeLauncher:
    """`pdlaunch serve CONFIG --node-rank K` inside node K's namespace, output in a file."""

    def __init__(self, nodes: TwoNodes, rank: int, config: Path, tmp: Path) -> None:
        self.rank = rank
        self.output_path = tmp / f"node{rank}.out"
        argv = [sys.executable, "-m", "pdlaunch", "serve", str(config), "--node-rank", str(rank),
                "--log-dir", str(tmp / f"logs-node{rank}")]
        # An in-process connector of an earlier test may have set UCX_NET_DEVICES=lo in this process (one-host
        # loopback binding): these nodes talk over the veth pair, so the launcher must not inherit it.
        env = {k: v for k, v in os.environ.items() if k != "UCX_NET_DEVICES"}
        env.update({"UCX_TLS": "tcp", "OMP_NUM_THREADS": "1"})
        self._out = open(self.output_path, "wb")
        # `ip netns exec` execs the command: this pid is the launcher's.
        self.proc = subprocess.Popen(nodes.exec_argv(rank, argv), stdout=self._out, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env=env)

    @property
    def output(self) -> str:
        return self.output_path.read_text(errors="replace")

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"node {self.rank}'s launcher exited with {self.proc.returncode}:\n{self.output}")

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


def completion(client: httpx.Client, url: str, model: Path, prompt: list[int], max_tokens: int,
               **extra: Any) -> dict[str, Any]:
    body = {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **extra}
    response = client.post(f"{url}/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()


@dataclass
class TwoNodeRun:
    seen: dict[str, Any]  # what node 0 saw: proxy answer, by-hand legs, KV and veth byte deltas, /info
    node0: NodeLauncher
    node1: NodeLauncher
    codes: tuple[int | None, int | None]  # exit codes of node 0's and node 1's launchers
    left: list[int]  # pids still in the namespaces after both launchers stopped


def run_pd_across_nodes(nodes: TwoNodes, model: Path, config: Path, tmp: Path, urls: tuple[str, str, str],
                        max_tokens: int, info_of: str, stop_node0_first: bool) -> TwoNodeRun:
    """Start node 1 then node 0, wait for the proxy, send the requests from node 0, stop both.

    urls: (proxy, prefill, decode). info_of: "prefill" or "decode", whose /info to return."""
    proxy, prefill, decode = urls
    node1, node0 = NodeLauncher(nodes, 1, config, tmp), NodeLauncher(nodes, 0, config, tmp)
    seen: dict[str, Any] = {}
    try:
        def ready() -> bool:
            node0.check_alive()
            node1.check_alive()
            # Both launchers done starting (each says so), not only the proxy answering: a launcher still
            # starting when it is stopped exits through its "while starting" path (a CI run lost that race).
            if "ready: OpenAI API at" not in node0.output or "instances ready" not in node1.output:
                return False
            try:
                return httpx.get(f"{proxy}/health", timeout=2, trust_env=False).status_code == 200
            except httpx.HTTPError:
                return False

        call_in_namespace(nodes.namespaces[0], lambda: wait_for(ready, "both launchers to say they are ready and "
                                                                "the proxy on node 0 to answer", START_TIMEOUT_S,
                                                                poll=0.5),
                          START_TIMEOUT_S + 10)

        def requests_from_node_a() -> dict[str, Any]:
            with httpx.Client(timeout=REQUEST_TIMEOUT_S, trust_env=False) as client:
                kv_before, rx_before = kv_bytes_received(client, decode), nodes.rx_bytes(1)
                through_proxy = completion(client, proxy, model, PROMPTS[0], max_tokens)
                kv_after, rx_after = kv_bytes_received(client, decode), nodes.rx_bytes(1)
                # The proxy's two legs by hand, to see what prefill advertises to decode.
                prefill_leg = completion(client, prefill, model, PROMPTS[1], 1,
                                         kv_transfer_params={"do_remote_decode": True})
                decode_leg = completion(client, decode, model, PROMPTS[1], max_tokens,
                                        kv_transfer_params=prefill_leg["kv_transfer_params"])
                return {"proxy": through_proxy, "kv": kv_after - kv_before, "rx": rx_after - rx_before,
                        "params": prefill_leg["kv_transfer_params"], "by_hand": decode_leg,
                        "info": client.get(f"{prefill if info_of == 'prefill' else decode}/info").json()}

        seen = call_in_namespace(nodes.namespaces[0], requests_from_node_a, 2 * REQUEST_TIMEOUT_S + 30)
    finally:
        order = [node0, node1] if stop_node0_first else [node1, node0]
        for launcher in order:
            launcher.interrupt()
        for launcher in order:
            launcher.wait()
    codes = (node0.proc.returncode, node1.proc.returncode)
    return TwoNodeRun(seen, node0, node1, codes, nodes.pids())
