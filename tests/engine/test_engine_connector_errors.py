"""A connector that raises for one request fails that request (502), never the engine step."""

from __future__ import annotations

from pdlaunch.engine.outputs import SamplingParams
from pdlaunch.kv_transfer.params import KVTransferParams
from tests.engine.conftest import MakeEngine
from tests.engine.test_engine_connector import CopyConnector, Hub, prefill, spec


class BrokenLoadConnector(CopyConnector):
    """start_load raises for prompts that start with token 13, as a bug on bad params would."""

    def start_load(self, request_id: str, prompt_token_ids: list[int], kv_transfer_params: KVTransferParams | None,
                   block_ids: list[list[int]], num_local_computed_tokens: int, num_external_tokens: int) -> None:
        if prompt_token_ids[0] == 13:
            raise TypeError("object of type 'int' has no len()")
        super().start_load(request_id, prompt_token_ids, kv_transfer_params, block_ids, num_local_computed_tokens,
                           num_external_tokens)


def test_a_connector_exception_fails_only_its_request(llama_ckpt, make_engine: MakeEngine) -> None:  # type: ignore[no-untyped-def]
    hub = Hub()
    p_engine = make_engine(llama_ckpt, instance=spec("prefill", "P"), connector=CopyConnector(hub, "P"))
    d_engine = make_engine(llama_ckpt, instance=spec("decode", "D"), connector=BrokenLoadConnector(hub, "D"))
    good_prompt, bad_prompt = [3, 4, 5, 6, 7, 8, 9, 10, 11], [13, 4, 5, 6, 7, 8, 9, 10, 11]
    p_good, p_bad = prefill(p_engine, [good_prompt, bad_prompt])
    d_engine.add_request("bad", bad_prompt, SamplingParams(max_tokens=3), p_bad.kv_transfer_params)
    d_engine.add_request("good", good_prompt, SamplingParams(max_tokens=3, ignore_eos=True), p_good.kv_transfer_params)
    done = {}
    for _ in range(50):
        done.update({o.request_id: o for o in d_engine.step() if o.finished})
        if not d_engine.has_unfinished_requests():
            break
    assert done["bad"].finish_reason == "error" and "TypeError" in (done["bad"].error or "")
    assert done["bad"].error_status == 502
    assert done["good"].finish_reason == "length" and len(done["good"].output_token_ids) == 3
    assert d_engine.block_manager.num_used_blocks() == 0
    hub.notices["P"] = {p_bad.request_id}
    p_engine.step()
