"""The decode instance of a PD pair finds a request's local prefix in its CPU tier: only the rest
is asked of the connector, and greedy output still equals transformers'."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_connector import CopyConnector, Hub, prefill, spec
from tests.helpers.checkpoints import hf_greedy
from tests.offload.test_engine_offload import GREEDY, OPTIONS, _prompts


def decode_leg(d_engine: LLMEngine, prompt: list[int], p_out: RequestOutput) -> dict[str, RequestOutput]:
    """Request "d0" of `prompt` on the decode with the prefill's answer, stepped to its end (block integrity checked
    after every step); the finished outputs by request id."""
    d_engine.add_request("d0", prompt, GREEDY, p_out.kv_transfer_params)
    final: dict[str, RequestOutput] = {}
    while d_engine.has_unfinished_requests():
        final.update({o.request_id: o for o in d_engine.step() if o.finished})
        d_engine.check_integrity()
    return final


def test_decode_loads_local_prefix_from_cpu_tier(hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    hub = Hub()
    p_conn, d_conn = CopyConnector(hub, "P"), CopyConnector(hub, "D")
    p_engine = make_engine(hybrid_ckpt, instance=spec("prefill", "P"), connector=p_conn, block_size=4)
    d_engine = make_engine(hybrid_ckpt, instance=spec("decode", "D"), connector=d_conn, **OPTIONS)
    prompt = _prompts([30], seed=41)[0]
    reference = hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)

    # The decode instance computed this prompt once (a plain request), then other requests pushed
    # its blocks out of the device cache into the CPU tier.
    assert run_all(d_engine, [prompt], GREEDY)[0].output_token_ids == reference
    for flush in _prompts([30, 29, 31], seed=42):
        run_all(d_engine, [flush], GREEDY)
    assert d_engine.block_manager.match_prefix(prompt, len(prompt) - 1).num_tokens == 0

    (p_out,) = prefill(p_engine, [prompt])
    before = d_engine.stats()
    final = decode_leg(d_engine, prompt, p_out)
    after = d_engine.stats()
    assert final["d0"].output_token_ids == reference
    cpu_tokens = 4 * ((len(prompt) - 1) // 4)
    # The connector was asked only for what the CPU tier did not have.
    assert d_conn.calls[-1] == ("d0", cpu_tokens, len(prompt) - 1 - cpu_tokens)
    assert after["offload_loaded_blocks"] - before["offload_loaded_blocks"] == cpu_tokens // 4
    assert after["prompt_tokens_computed"] - before["prompt_tokens_computed"] == 1

    p_engine.step()  # the decode side's notification frees the prefill side's held blocks
    assert p_engine.block_manager.num_used_blocks() == 0


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_connector_load_into_evicted_blocks_does_not_reach_cpu_tier(device: str, hybrid_ckpt: Path,
                                                                    make_engine: MakeEngine) -> None:
    """A PD request's blocks may be cached ones just evicted, whose KV the CPU tier has yet to store: the
    connector's load must not overwrite them first, or the tier keeps the other prompt's KV under this
    prefix and a later hit on it loads wrong KV."""
    hub = Hub()
    p_conn, d_conn = CopyConnector(hub, "P"), CopyConnector(hub, "D")
    p_engine = make_engine(hybrid_ckpt, device=device, instance=spec("prefill", "P"), connector=p_conn, block_size=4)
    d_engine = make_engine(hybrid_ckpt, device=device, instance=spec("decode", "D"), connector=d_conn, **OPTIONS)
    cached, remote = _prompts([30, 30], seed=43)
    reference = hf_greedy(hybrid_ckpt, cached, GREEDY.max_tokens)
    assert run_all(d_engine, [cached], GREEDY)[0].output_token_ids == reference

    # The PD request's allocation evicts `cached`'s blocks; the connector writes `remote`'s KV into them.
    (p_out,) = prefill(p_engine, [remote])
    decode_leg(d_engine, remote, p_out)
    assert d_engine.stats()["offload_stored_blocks"] > 0
    p_engine.step()  # the decode side's notification frees the prefill side's held blocks

    before = d_engine.stats()
    assert run_all(d_engine, [cached], GREEDY)[0].output_token_ids == reference
    assert d_engine.stats()["offload_loaded_blocks"] > before["offload_loaded_blocks"]  # the tier served it


def test_decode_loads_short_cpu_prefix_before_a_long_remote_part(hybrid_ckpt: Path,
                                                                  make_engine: MakeEngine) -> None:
    """A CPU-tier prefix far before where the connector's part ends: the sliding-window group needs none
    of its blocks any more (its table has no device blocks there); the full group's still load."""
    hub = Hub()
    p_conn, d_conn = CopyConnector(hub, "P"), CopyConnector(hub, "D")
    p_engine = make_engine(hybrid_ckpt, instance=spec("prefill", "P"), connector=p_conn, block_size=4)
    d_engine = make_engine(hybrid_ckpt, instance=spec("decode", "D"), connector=d_conn, **OPTIONS)
    cached, tail = _prompts([30, 16], seed=44)
    prompt = cached[:14] + tail
    reference = hf_greedy(hybrid_ckpt, prompt, GREEDY.max_tokens)
    run_all(d_engine, [cached], GREEDY)
    for flush in _prompts([30, 29, 31], seed=45):
        run_all(d_engine, [flush], GREEDY)
    assert d_engine.block_manager.match_prefix(prompt, len(prompt) - 1).num_tokens == 0

    (p_out,) = prefill(p_engine, [prompt])
    before = d_engine.stats()
    final = decode_leg(d_engine, prompt, p_out)
    assert final["d0"].finish_reason != "error", final["d0"]
    assert final["d0"].output_token_ids == reference
    assert d_conn.calls[-1] == ("d0", 12, len(prompt) - 1 - 12)  # 3 blocks from the CPU tier, the rest remote
    assert d_engine.stats()["offload_loaded_blocks"] - before["offload_loaded_blocks"] == 3
    p_engine.step()
