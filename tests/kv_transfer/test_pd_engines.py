"""PD end to end: a prefill LLMEngine and a decode LLMEngine in two processes, real connectors.

Greedy outputs of decode must equal a colocated engine's, for 1-token prompts, exactly-one-block
prompts, many blocks, and a decode-side prefix-cache hit (only the missing blocks move); both
engines pass check_integrity and hold no block afterwards. A model with a sliding-window group gets
no such hit: the earlier load moved only that group's last window, so decode never held the shared
blocks there (they must not be cached as if it had).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from pdlaunch.engine.llm import build_config
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import SamplingParams
from tests.kv_transfer.deployment_secret import secured
from tests.kv_transfer.engine_procs import EngineProcess, pd_config

BLOCK = 8
GREEDY = {"max_tokens": 6, "temperature": 0.0, "ignore_eos": True}

_rng = random.Random(7)
MANY = [_rng.randrange(3, 500) for _ in range(6 * BLOCK + 3)]
PROMPTS = {
    "one-token": [17],
    "one-block": [_rng.randrange(3, 500) for _ in range(BLOCK)],
    "block-plus-one": [_rng.randrange(3, 500) for _ in range(BLOCK + 1)],
    "many-blocks": MANY,
}
# Shares MANY's first 3 blocks: decode's prefix cache holds them after the first batch.
PREFIX_HIT = MANY[:3 * BLOCK] + [_rng.randrange(3, 500) for _ in range(5)]


def colocated(model: Path, prompts: dict[str, list[int]], device: str = "cpu", **overrides: object
              ) -> dict[str, list[int]]:
    overrides = {"block_size": BLOCK, "num_gpu_blocks": 96, **overrides}
    engine = LLMEngine(secured(build_config(str(model), device, "float32", overrides)))
    try:
        for rid, prompt in prompts.items():
            engine.add_request(rid, prompt, SamplingParams(**GREEDY))
        final: dict[str, list[int]] = {}
        while engine.has_unfinished_requests():
            final.update({o.request_id: o.output_token_ids for o in engine.step() if o.finished})
        return final
    finally:
        engine.shutdown()


def pd_pair(model: Path, connector: str, mode: str, storage: str = "", device: str = "cpu",
            devices: tuple[int, int] = (0, 0), **overrides: object) -> Iterator[tuple[EngineProcess, EngineProcess]]:
    """Yields once: (prefill, decode) engine processes; both closed afterwards."""
    config = pd_config(str(model), connector, mode, storage, device, **overrides)
    gpu = device == "cuda"
    prefill = EngineProcess(config, InstanceSpec(role="prefill", port=1, engine_id=f"P-{mode}", device=device,
                                                 devices=[devices[0]] if gpu else []))
    try:
        decode = EngineProcess(config, InstanceSpec(role="decode", port=2, engine_id=f"D-{mode}", device=device,
                                                    devices=[devices[1]] if gpu else []))
        try:
            yield prefill, decode
        finally:
            decode.close()
    finally:
        prefill.close()


def run_pd(prefill: EngineProcess, decode: EngineProcess, prompts: dict[str, list[int]]) -> dict[str, dict]:
    first = prefill.call("generate", [(rid, p, {**GREEDY, "max_tokens": 1}, {"do_remote_decode": True})
                                      for rid, p in prompts.items()])
    for out in first.values():
        assert out["finish_reason"] == "length" and out["kv_transfer_params"]["do_remote_prefill"], out
    outs = decode.call("generate", [(rid, p, GREEDY, first[rid]["kv_transfer_params"]) for rid, p in prompts.items()])
    for rid, out in outs.items():
        assert out["error"] is None, f"{rid}: {out['error']}"
        # cached_tokens: the decode's own prefix-cache hits (whole blocks), never the tokens it loaded
        assert out["num_cached_tokens"] % BLOCK == 0 and out["num_cached_tokens"] < len(prompts[rid])
    assert prefill.call("drain") == 0  # every held block came back
    return outs


def check_pd(model: Path, prefill: EngineProcess, decode: EngineProcess, connector: str, device: str = "cpu") -> None:
    expected = colocated(model, {**PROMPTS, "prefix-hit": PREFIX_HIT}, device)
    outs = run_pd(prefill, decode, PROMPTS)
    assert {rid: o["tokens"] for rid, o in outs.items()} == {rid: expected[rid] for rid in PROMPTS}

    before = decode.call("check")
    hit = run_pd(prefill, decode, {"prefix-hit": PREFIX_HIT})
    assert hit["prefix-hit"]["tokens"] == expected["prefix-hit"]
    after = decode.call("check")
    moved = after["bytes_moved"] - before["bytes_moved"]
    if connector == "nixl":
        assert moved == _prefix_hit_bytes(after["block_bytes"], after["windows"])
    else:  # storage moves tokens: positions 24..27 of the 4th block
        assert moved == sum(after["block_bytes"]) * 4 // BLOCK
    for side in (prefill, decode):
        state = side.call("check")
        assert state["used_blocks"] == 0 and state["stats"]["num_held"] == 0
    assert prefill.call("check")["expired"] == 0


def _prefix_hit_bytes(block_bytes: list[int], windows: list[int | None]) -> int:
    """Bytes a NIXL load of PREFIX_HIT moves: full-attention groups hold MANY's first 3 blocks, so only
    the 4th block (positions 24..27) moves. A sliding-window group got only MANY's last window, so no group
    has a hit: full groups move blocks 0..3, sliding ones the window before position 28."""
    end = len(PREFIX_HIT) - 1  # decode computes the last prompt token itself
    local = 0 if any(w is not None for w in windows) else 3 * BLOCK
    first = [local if w is None else max(local, end - w) for w in windows]
    return sum(b * ((end - 1) // BLOCK - f // BLOCK + 1) for b, f in zip(block_bytes, first))


@pytest.mark.e2e
# Each mode on two checkpoint families (llama and llama32 share the attention layout: llama pushes in
# test_e2e_pd.py's deployments).
@pytest.mark.parametrize("fixture,mode", [("llama_ckpt", "pull"), ("qwen3_ckpt", "pull"), ("llama32_ckpt", "push"),
                                          ("qwen3_tied_ckpt", "push"), ("qwen3_tied_ckpt", "pull")])
@pytest.mark.slow
def test_nixl_pd_equals_colocated(fixture: str, mode: str, request: pytest.FixtureRequest) -> None:
    model = request.getfixturevalue(fixture)
    for prefill, decode in pd_pair(model, "nixl", mode):
        assert decode.info["transfer_mode"] == mode
        check_pd(model, prefill, decode, "nixl")


@pytest.mark.e2e
@pytest.mark.slow
def test_storage_pd_equals_colocated(llama_ckpt: Path, tmp_path: Path) -> None:
    for prefill, decode in pd_pair(llama_ckpt, "storage", "auto", str(tmp_path)):
        check_pd(llama_ckpt, prefill, decode, "storage")


@pytest.mark.e2e
@pytest.mark.slow
def test_hybrid_sliding_window_groups_over_push(hybrid_ckpt: Path) -> None:
    # Chunked prefill (16-token steps) makes prefill drop sliding-window blocks before it finishes.
    prompts = {"long": MANY, "short": PROMPTS["block-plus-one"]}
    expected = colocated(hybrid_ckpt, prompts)
    for prefill, decode in pd_pair(hybrid_ckpt, "nixl", "push", max_num_batched_tokens=16):
        outs = run_pd(prefill, decode, prompts)
        assert {rid: o["tokens"] for rid, o in outs.items()} == expected
        assert decode.call("check")["used_blocks"] == 0
