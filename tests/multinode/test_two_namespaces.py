"""Multi-node PD on one machine: node 0 (proxy + prefill) and node 1 (decode) in two network
namespaces joined by a veth pair, each started by its own `pdlaunch serve CONFIG --node-rank K`.

UCX_TLS=tcp: both namespaces share one kernel, so by default UCX sees the peer as intra-node and
reads the KV through process memory (cma) while only its control traffic crosses the veth. Real nodes
share no memory; with tcp alone the KV bytes must cross the veth, which the test checks on its counters.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.multinode.netns import TwoNodes
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS, run_pd_across_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROXY_PORT, PREFILL_PORT, DECODE_PORT, SIDE_CHANNEL_PORT = 8000, 8100, 8200, 5600
MAX_TOKENS = 8


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
security: {{deployment_secret: multinode-test-secret-0123456789}}
instances:
  - {{role: prefill, count: 1, node: 0, base_port: {PREFILL_PORT}}}
  - {{role: decode, count: 1, node: 1, base_port: {DECODE_PORT}}}
""")
    return path


def test_pd_request_across_two_namespaces(nodes: TwoNodes, llama_ckpt: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, llama_ckpt, nodes)
    node_a, node_b = nodes.addresses
    urls = (f"http://{node_a}:{PROXY_PORT}", f"http://{node_a}:{PREFILL_PORT}", f"http://{node_b}:{DECODE_PORT}")
    run = run_pd_across_nodes(nodes, llama_ckpt, config, tmp_path, urls, MAX_TOKENS, info_of="decode",
                              stop_node0_first=False)
    seen = run.seen

    assert seen["kv"] > 0, "the decode instance on node 1 received no KV over NIXL"
    assert seen["rx"] >= seen["kv"], (f"node 1's veth received {seen['rx']} bytes while {seen['kv']} KV bytes "
                                      "arrived: the KV did not cross between the nodes' network stacks")
    assert seen["params"]["remote_host"] == node_a and seen["params"]["remote_port"] == SIDE_CHANNEL_PORT
    assert seen["info"]["num_pending_requests"] == 0

    with LLM(str(llama_ckpt), device="cpu", num_gpu_blocks=NUM_BLOCKS) as colocated:
        reference = colocated.generate(PROMPTS, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0,
                                                               ignore_eos=True))
    assert seen["proxy"]["choices"][0]["token_ids"] == reference[0].token_ids
    assert seen["by_hand"]["choices"][0]["token_ids"] == reference[1].token_ids

    assert run.codes == (0, 0), f"exit codes (node 0, node 1) {run.codes}:\n{run.node0.output}\n{run.node1.output}"
    assert not run.left, f"processes left in the namespaces after both launchers stopped: {run.left}"
    assert "the proxy runs on node 0" in run.node1.output
    assert all("stopped: all processes reaped" in launcher.output for launcher in (run.node0, run.node1))
