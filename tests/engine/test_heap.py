"""The engine keeps its startup heap out of the garbage collector's walks while it serves (memory/heap.py)."""

from __future__ import annotations

import gc
from pathlib import Path

from pdlaunch.engine.outputs import SamplingParams
from tests.engine.conftest import MakeEngine, run_all


def test_a_built_engine_freezes_its_heap_and_shutdown_gives_it_back(llama_ckpt: Path,
                                                                    make_engine: MakeEngine) -> None:
    gc.unfreeze()
    engine = make_engine(llama_ckpt)
    frozen = gc.get_freeze_count()
    # The model's modules and parameters are among the frozen objects.
    assert frozen > 1000
    out = run_all(engine, [[5, 6, 7]], SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True))
    assert len(out[0].output_token_ids) == 4
    tracked = {id(o) for o in gc.get_objects()}
    assert id(engine.runner.model) not in tracked  # frozen objects are in no generation the collector walks
    engine.shutdown()
    assert gc.get_freeze_count() == 0
    assert id(engine.runner) in {id(o) for o in gc.get_objects()}
