"""A TP group spanning two "nodes" (network namespaces joined by a veth pair, one launcher each).

prefill-0 has TP 2: node 0 lists one rank slot, so rank 0 runs there (node 0's launcher) and rank 1
on node 1 (started by node 1's launcher as a remote rank, joined over the veth: torch.distributed
gloo at node 0's address, steps over the rank link). decode-0 (TP 2) runs on node 1. Decode rank r
reads prefill rank r, each at its own node's address (remote_hosts): rank 0's KV crosses the veth
over UCX tcp. Greedy output equals a single-process engine's; both launchers stop cleanly and
nothing is left in the namespaces.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.multinode.netns import TwoNodes, call_in_namespace
from tests.multinode.test_two_namespaces import (  # noqa: F401 - `nodes` is a fixture
    NUM_BLOCKS, PROMPTS, REQUEST_TIMEOUT_S, START_TIMEOUT_S, NodeLauncher, completion, kv_bytes_received, nodes,
    pytestmark,
)
from tests.serving.helpers import wait_for

PROXY_PORT, PREFILL_PORT, DECODE_PORT, SIDE_CHANNEL_PORT, MASTER_PORT = 8000, 8100, 8200, 5600, 29600
MAX_TOKENS = 6


def write_config(directory: Path, model: Path, nodes: TwoNodes) -> Path:
    a, b = nodes.addresses
    path = directory / "tp-spans-nodes.yaml"
    path.write_text(f"""\
device: cpu
model: {{path: "{model}"}}
cache: {{num_gpu_blocks: {NUM_BLOCKS}}}
parallel:
  nodes: [{{address: {a}, devices: [0]}}, {{address: {b}, devices: [0, 1, 2]}}]
  master_addr: {a}
  master_port: {MASTER_PORT}
kv_transfer:
  connector: nixl
  side_channel_host: 0.0.0.0
  side_channel_port: {SIDE_CHANNEL_PORT}
proxy: {{host: {a}, port: {PROXY_PORT}}}
instances:
  - {{role: prefill, count: 1, tp: 2, node: 0, base_port: {PREFILL_PORT}}}
  - {{role: decode, count: 1, tp: 2, node: 1, base_port: {DECODE_PORT}}}
""")
    return path


def test_prefill_tp_group_spans_two_namespaces(nodes: TwoNodes, llama_ckpt: Path, tmp_path: Path) -> None:
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
                through_proxy = completion(client, proxy, llama_ckpt, PROMPTS[0], max_tokens=MAX_TOKENS)
                kv_after, rx_after = kv_bytes_received(client, decode), nodes.rx_bytes(1)
                prefill_leg = completion(client, prefill, llama_ckpt, PROMPTS[1], max_tokens=1,
                                         kv_transfer_params={"do_remote_decode": True})
                decode_leg = completion(client, decode, llama_ckpt, PROMPTS[1], max_tokens=MAX_TOKENS,
                                        kv_transfer_params=prefill_leg["kv_transfer_params"])
                return {"proxy": through_proxy, "kv": kv_after - kv_before, "rx": rx_after - rx_before,
                        "params": prefill_leg["kv_transfer_params"], "by_hand": decode_leg,
                        "prefill_info": client.get(f"{prefill}/info").json()}

        seen = call_in_namespace(nodes.namespaces[0], requests_from_node_a, 2 * REQUEST_TIMEOUT_S + 30)

        info = seen["prefill_info"]
        assert info["tp_size"] == 2 and info["rank_engine_ids"] == [info["engine_id"]] * 2
        params = seen["params"]
        assert params["remote_hosts"] == [node_a, node_b], params
        assert params["remote_ports"] == [SIDE_CHANNEL_PORT, SIDE_CHANNEL_PORT], params
        assert seen["kv"] > 0 and seen["rx"] > 0, seen

        with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as single:
            reference = single.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                                ignore_eos=True))
        assert seen["proxy"]["choices"][0]["token_ids"] == reference[0].token_ids
        assert seen["by_hand"]["choices"][0]["token_ids"] == reference[1].token_ids
    finally:
        for launcher in reversed(launchers):  # node 0 first: rank 0 ends its group, node 1's rank follows
            launcher.interrupt()
        codes = [launcher.wait() for launcher in reversed(launchers)]
    left = nodes.pids()
    node1, node0 = launchers
    assert codes == [0, 0], f"exit codes (node 0, node 1) {codes}:\n{node0.output}\n{node1.output}"
    assert not left, f"processes left in the namespaces after both launchers stopped: {left}"
    assert all("stopped: all processes reaped" in launcher.output for launcher in launchers)
