"""A killed decode on a GPU it shares with its prefill (KV pushed over CUDA IPC) comes back with its whole KV cache:
the prefill forgot the dead decode's NIXL agent before the restart, and with UCX's IPC cache off that unmapped the
dead decode's KV cache, so its GPU memory was free again. Before, the prefill's mapping kept it allocated (about
half the GPU here) and the restarted decode found too little memory for its KV cache.

Asserts: the restarted decode has as many KV blocks as its first start, the GPU's used memory comes back to its
level before the kill, the supervisor said the prefill forgot the agent, and a request works again."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from tests.serving.e2e import Serve
from tests.serving.helpers import wait_for
from tests.serving.test_forget_dead_engine_e2e import back, complete, info

# gpu_serial: each instance takes a share of the GPU's memory, which tests beside it would hold
pytestmark = [pytest.mark.gpu, pytest.mark.gpu_serial, pytest.mark.e2e]

CONFIG = """\
device: cuda
model: {path: tiny, dtype: bfloat16, max_model_len: 1024}
cache: {gpu_memory_utilization: 0.4}
supervision: {restart_backoff_seconds: 0.5}
kv_transfer: {transfer_mode: push}
instances:
  - {role: prefill, count: 1, devices: [0]}
  - {role: decode, count: 1, devices: [0]}
"""
RESTART_TIMEOUT_S = 400.0  # a restarted instance loads, profiles and captures its CUDA graphs again
MEMORY_TIMEOUT_S = 60.0
BLOCKS_KEPT = 0.97  # of the first start's KV blocks, at least
SLACK_BYTES = 2 << 30  # allocator and graph-pool noise between two starts; the dead KV cache is ~0.4 of the GPU


def used_bytes() -> int:
    import torch

    free, total = torch.cuda.mem_get_info(0)
    return int(total - free)


def test_a_killed_decode_gets_its_gpu_memory_back(tmp_path: Path) -> None:
    import torch

    config = tmp_path / "pd.yaml"
    config.write_text(CONFIG)
    torch.cuda.init()  # this process's own CUDA context is counted in every measure alike
    used_bytes()
    serve = Serve(tmp_path, [str(config)], device="cuda")
    try:
        serve.wait_ready()
        urls = serve.instance_urls()
        decode = urls["decode-0"]
        first = complete(serve)  # the prefill WRITEs into the decode's KV cache: UCX maps it over CUDA IPC
        dead = info(decode)
        before = used_bytes()
        blocks = dead["num_blocks_total"]
        assert isinstance(blocks, int) and blocks > 0, dead

        os.kill(int(dead["pid"]), signal.SIGKILL)
        wait_for(lambda: back(serve, decode, f"{dead['engine_id']}-r1"), "decode-0 to be back after SIGKILL",
                 RESTART_TIMEOUT_S, poll=1.0)
        assert "prefill-0 forgot decode-0's NIXL agent (1)" in serve.output, serve.output
        # Not exactly equal: the first start profiled beside the prefill's own start (H200: 1800368 blocks first,
        # 1825506 after the restart); with the dead KV cache still mapped the restart found no room at all.
        again = info(decode)["num_blocks_total"]
        assert again >= BLOCKS_KEPT * blocks, f"the restarted decode has a smaller KV cache: {again} < {blocks}"
        assert complete(serve) == first
        wait_for(lambda: used_bytes() <= before + SLACK_BYTES,
                 f"the GPU's used memory to come back to its level before the kill ({before / 2**30:.1f} GiB)",
                 MEMORY_TIMEOUT_S, poll=1.0)
    finally:
        serve.stop()
    assert serve.proc.returncode == 0, serve.output
