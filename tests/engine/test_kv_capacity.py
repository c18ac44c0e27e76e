"""An engine's KV capacity (engine/kv_capacity.py) is what its admission refuses by: a request that needs more blocks
than the whole cache has gets exactly KVCapacity.refusal's error, the one a PD prefill restates for its decode
(server/decode_limits.py); a request that fits is admitted. With a full-attention group every block of the request
counts; with sliding-window groups alone, at most the window and one step's prompt chunk."""

from __future__ import annotations

from pathlib import Path

import pytest

from pdlaunch.engine.kv_capacity import KVCapacity
from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError
from tests.engine.conftest import MakeEngine, run_all


def test_the_engine_refuses_what_its_capacity_says(llama_ckpt: Path, make_engine: MakeEngine) -> None:
    engine = make_engine(llama_ckpt, num_gpu_blocks=16, max_model_len=256)  # 128 tokens under 256
    capacity = engine.kv_capacity
    assert capacity == KVCapacity(num_blocks=16, block_size=8)
    assert engine.longest_request == 128
    expected = capacity.refusal(20 + 109)
    assert expected is not None
    with pytest.raises(EngineError) as raised:
        engine.add_request("too-large", [5] * 20, SamplingParams(max_tokens=109, temperature=0.0))
    assert (raised.value.message, raised.value.field, raised.value.hint) == (expected.message, expected.field,
                                                                             expected.hint)
    out = run_all(engine, [[5] * 20], SamplingParams(max_tokens=108, temperature=0.0, ignore_eos=True))
    assert (len(out[0].output_token_ids), out[0].finish_reason) == (108, "length")  # all 16 blocks


def test_sliding_windows_alone_bound_what_a_request_holds(mistral_ckpt: Path, make_engine: MakeEngine) -> None:
    """Mistral with a window of 8 on every layer: a request holds the window and one chunk, whatever its length."""
    engine = make_engine(mistral_ckpt, num_gpu_blocks=8, max_num_batched_tokens=16, max_model_len=256)
    capacity = engine.kv_capacity
    assert capacity == KVCapacity(num_blocks=8, block_size=8, window_blocks=-(-(16 + 8) // 8) + 1)
    assert capacity.refusal(256) is None and engine.longest_request == 256
    engine.add_request("long", [5] * 100, SamplingParams(max_tokens=150, temperature=0.0))  # 32 blocks if full
    engine.abort_request("long")
