"""A decode whose remote KV arrived waits with its blocks until a sequence slot frees; a request preempted meanwhile
was queued in front of it and, needing more blocks than are free (the waiting one holds the rest), could never be
admitted: nothing ran, nothing freed a block, the engine stepped forever. Preempted requests now queue behind the
requests that already hold their blocks."""

from __future__ import annotations

from pathlib import Path

from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.engine.outputs import RequestOutput, SamplingParams
from tests.engine.conftest import MakeEngine, run_all
from tests.engine.test_engine_connector import CopyConnector, Hub, spec

REMOTE = list(range(40, 60))  # 20 tokens: 3 blocks of 8
LOCAL = [7, 8, 9, 10, 11]
GREEDY = SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True)
LONG = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)  # grows past 3 blocks


def _prefill(p_engine: LLMEngine) -> RequestOutput:
    p_engine.add_request("w", REMOTE, GREEDY.model_copy(update={"max_tokens": 1}),
                         kv_transfer_params={"do_remote_decode": True})
    answer: RequestOutput | None = None
    while p_engine.has_unfinished_requests():
        answer = next((o for o in p_engine.step() if o.finished), answer)
    assert answer is not None and answer.kv_transfer_params
    return answer


def test_a_preempted_request_does_not_wait_forever_behind_one_holding_arrived_kv(
        llama_ckpt: Path, make_engine: MakeEngine) -> None:
    reference = run_all(make_engine(llama_ckpt), [REMOTE, LOCAL], [GREEDY, LONG])
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=CopyConnector(hub, "D"),
                           num_gpu_blocks=6, max_num_seqs=1, max_num_batched_tokens=64)
    answer = _prefill(p_engine)
    d_engine.add_request("w", REMOTE, GREEDY, answer.kv_transfer_params)  # consulted first: parked for its KV
    d_engine.add_request("r", LOCAL, LONG)  # takes the one sequence slot
    final: dict[str, RequestOutput] = {}
    steps = 0
    while d_engine.has_unfinished_requests():
        final.update({o.request_id: o for o in d_engine.step() if o.finished})
        d_engine.check_integrity()
        steps += 1
        assert steps < 500, (f"no progress: running {[r.request_id for r in d_engine.scheduler.running]}, "
                             f"waiting {[r.request_id for r in d_engine.scheduler.waiting]}")
    assert d_engine.scheduler.num_preemptions > 0
    assert [final[rid].output_token_ids for rid in ("w", "r")] == [o.output_token_ids for o in reference]
    p_engine.step()  # the decode's notice: the prefill's held blocks go back
