"""FP8 KV cache through the PD paths a deployment takes besides a plain NIXL push: NIXL pull with a
decode prefix-cache hit and a prefill that sleeps and wakes (the CPU sleep backend gives its fp8 KV new
storage), and the Mooncake connector (push, with the same hit and sleep). Every answer equals a
colocated engine's with --kv-cache-dtype fp8; a prefix hit moves only the missing block, in fp8 bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.config.deployment_config import InstanceSpec
from tests.kv_transfer.engine_procs import build_engine, pd_config
from tests.kv_transfer.mooncake_skip import requires_mooncake
from tests.kv_transfer.rpc import ProcessRPC
from tests.kv_transfer.test_pd_engines import PREFIX_HIT, PROMPTS, colocated, run_pd
from tests.kv_transfer.test_wake_reregister import build_sleepy_engine

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
FP8 = {"kv_cache_dtype": "fp8"}
FP8_BLOCK_BYTES = 2 * 2 * 8 * 2 * 128  # layers x (k, v) x block of 8 x 2 KV heads x head_dim 128, one byte each


def _answers(outs: dict[str, dict]) -> dict[str, list[int]]:
    return {rid: out["tokens"] for rid, out in outs.items()}


def _sleepy_pd(model: Path, connector: str, mode: str) -> tuple[ProcessRPC, ProcessRPC]:
    """(prefill that can sleep_wake, decode), fp8 KV on both."""
    config = pd_config(str(model), connector, mode, **FP8)
    config.model.enable_sleep_mode = True
    p_spec = InstanceSpec(role="prefill", port=1, engine_id=f"P-fp8-{connector}-{mode}", device="cpu")
    d_spec = InstanceSpec(role="decode", port=2, engine_id=f"D-fp8-{connector}-{mode}", device="cpu")
    prefill = ProcessRPC(build_sleepy_engine, config.model_dump_json(), p_spec.model_dump_json())
    try:
        return prefill, ProcessRPC(build_engine, config.model_dump_json(), d_spec.model_dump_json())
    except BaseException:
        prefill.close()
        raise


def _check_sleep_and_prefix_hit(prefill: ProcessRPC, decode: ProcessRPC, expected: dict[str, list[int]]) -> None:
    assert _answers(run_pd(prefill, decode, PROMPTS)) == {rid: expected[rid] for rid in PROMPTS}
    before = decode.call("check")
    assert _answers(run_pd(prefill, decode, {"prefix-hit": PREFIX_HIT})) == {"prefix-hit": expected["prefix-hit"]}
    after = decode.call("check")
    assert sum(after["block_bytes"]) == FP8_BLOCK_BYTES
    assert after["bytes_moved"] - before["bytes_moved"] == FP8_BLOCK_BYTES  # only the 4th block
    woke = prefill.call("sleep_wake")
    assert woke["moved"], "the CPU sleep backend should have given the fp8 KV new storage"
    again = run_pd(prefill, decode, {f"{rid}-2": p for rid, p in PROMPTS.items()})
    assert _answers(again) == {f"{rid}-2": expected[rid] for rid in PROMPTS}
    for side in (prefill, decode):
        assert side.call("check")["used_blocks"] == 0


def test_fp8_kv_pull_prefix_hit_and_prefill_wake(fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    model = fp8_ckpts["online"][0]  # a float32 checkpoint: the fp8 cache holds a quarter of its bytes
    expected = colocated(model, {**PROMPTS, "prefix-hit": PREFIX_HIT}, **FP8)
    prefill, decode = _sleepy_pd(model, "nixl", "pull")
    try:
        assert decode.call("info")["transfer_mode"] == "pull"
        _check_sleep_and_prefix_hit(prefill, decode, expected)
    finally:
        decode.close()
        prefill.close()


@requires_mooncake
def test_fp8_kv_over_mooncake(fp8_ckpts: dict[str, tuple[Path, Path]]) -> None:
    """Mooncake's default (push: the prefill WRITEs into the decode's fp8 blocks); its pull path reads
    through the same registrations as NIXL's (tests/kv_transfer/test_mooncake_pd_engines.py)."""
    model = fp8_ckpts["online"][0]
    expected = colocated(model, {**PROMPTS, "prefix-hit": PREFIX_HIT}, **FP8)
    prefill, decode = _sleepy_pd(model, "mooncake", "auto")
    try:
        info = decode.call("info")
        assert (info["connector"], info["transfer_mode"]) == ("mooncake", "push")
        _check_sleep_and_prefix_hit(prefill, decode, expected)
    finally:
        decode.close()
        prefill.close()


@pytest.mark.parametrize("prefill_dtype, decode_dtype", [("fp8", "auto"), ("auto", "fp8")])
def test_instances_of_other_kv_dtypes_refuse_each_other(fp8_ckpts: dict[str, tuple[Path, Path]],
                                                        prefill_dtype: str, decode_dtype: str) -> None:
    """Each instance's dtype as the launcher hands it (InstanceSpec.kv_cache_dtype, from its group): a pair
    that check-config would refuse, started anyway, fails the request at the handshake naming both sides'
    dtypes, and the prefill's held blocks come back (the lease)."""
    model = fp8_ckpts["online"][0]
    config = pd_config(str(model), "nixl", "pull")
    config.kv_transfer.load_failure_policy = "fail"
    config.kv_transfer.kv_lease_seconds = 2.0
    names = {"fp8": "float8_e4m3fn", "auto": "float32"}
    p_spec = InstanceSpec(role="prefill", port=1, engine_id="P-mixed", device="cpu", kv_cache_dtype=prefill_dtype)
    d_spec = InstanceSpec(role="decode", port=2, engine_id="D-mixed", device="cpu", kv_cache_dtype=decode_dtype)
    prefill = ProcessRPC(build_engine, config.model_dump_json(), p_spec.model_dump_json())
    try:
        decode = ProcessRPC(build_engine, config.model_dump_json(), d_spec.model_dump_json())
        try:
            prompt = PROMPTS["many-blocks"]
            first = prefill.call("generate", [("r", prompt, {"temperature": 0.0, "max_tokens": 1},
                                               {"do_remote_decode": True})])["r"]
            out = decode.call("generate", [("r", prompt, {"temperature": 0.0, "max_tokens": 4},
                                            first["kv_transfer_params"])])["r"]
            assert out["error"] is not None, out
            assert (f"kv_cache_dtype differs (prefill engine P-mixed: {names[prefill_dtype]!r}, "
                    f"this engine: {names[decode_dtype]!r})") in out["error"], out["error"]
            assert decode.call("check")["used_blocks"] == 0
            assert prefill.call("drain") == 0
        finally:
            decode.close()
    finally:
        prefill.close()
