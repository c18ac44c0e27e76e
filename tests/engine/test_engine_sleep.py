"""Engine sleep mode on CPU (tensor backend): same tokens after waking, prefix cache forgotten."""

from __future__ import annotations

import pytest

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.errors import EngineError, PdlaunchError
from tests.engine.conftest import MakeEngine, run_all

PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15], [40, 41, 42]]
GREEDY = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)


@pytest.mark.parametrize("level", [1, 2])
def test_sleep_and_wake_keep_outputs(level: int, llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    before = [o.output_token_ids for o in run_all(engine, PROMPTS, GREEDY)]
    result = engine.sleep(level)
    assert engine.is_sleeping() and result.freed_bytes > 0
    assert engine.runner.kv_caches[0].untyped_storage().nbytes() == 0
    with pytest.raises(EngineError, match="sleeping"):
        engine.add_request("x", PROMPTS[0], GREEDY)
    engine.wake_up(["weights"])
    assert engine.is_sleeping()  # the KV cache is still asleep
    engine.wake_up()
    assert not engine.is_sleeping()
    after = run_all(engine, PROMPTS, GREEDY)
    assert [o.output_token_ids for o in after] == before
    assert all(o.num_cached_tokens == 0 for o in after)  # the discarded KV is never reused


def test_sleep_refused_while_busy_or_disabled(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    engine = make_engine(llama_ckpt, enable_sleep_mode=True)
    engine.add_request("busy", PROMPTS[0], GREEDY)
    with pytest.raises(PdlaunchError, match="idle"):
        engine.sleep(1)
    assert not engine.is_sleeping()
    engine.abort_request("busy")
    plain = make_engine(llama_ckpt)
    with pytest.raises(EngineError, match="not enabled") as info:
        plain.sleep(1)
    assert info.value.field == "model.enable_sleep_mode" and not plain.is_sleeping()
