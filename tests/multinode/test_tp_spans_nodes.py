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

import pytest

from pdlaunch.engine.llm import LLM
from pdlaunch.engine.outputs import SamplingParams
from tests.multinode.netns import TwoNodes
from tests.multinode.two_node_run import NUM_BLOCKS, PROMPTS, run_pd_across_nodes

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

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
security: {{deployment_secret: multinode-test-secret-0123456789}}
instances:
  - {{role: prefill, count: 1, tp: 2, node: 0, base_port: {PREFILL_PORT}}}
  - {{role: decode, count: 1, tp: 2, node: 1, base_port: {DECODE_PORT}}}
""")
    return path


def test_prefill_tp_group_spans_two_namespaces(nodes: TwoNodes, llama_ckpt: Path, tmp_path: Path) -> None:
    config = write_config(tmp_path, llama_ckpt, nodes)
    node_a, node_b = nodes.addresses
    urls = (f"http://{node_a}:{PROXY_PORT}", f"http://{node_a}:{PREFILL_PORT}", f"http://{node_b}:{DECODE_PORT}")
    # node 0 first: rank 0 ends its group, node 1's rank follows
    run = run_pd_across_nodes(nodes, llama_ckpt, config, tmp_path, urls, MAX_TOKENS, info_of="prefill",
                              stop_node0_first=True)
    seen = run.seen

    info = seen["info"]
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

    assert run.codes == (0, 0), f"exit codes (node 0, node 1) {run.codes}:\n{run.node0.output}\n{run.node1.output}"
    assert not run.left, f"processes left in the namespaces after both launchers stopped: {run.left}"
    assert all("stopped: all processes reaped" in launcher.output for launcher in (run.node0, run.node1))
