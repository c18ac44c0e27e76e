"""PD first token, piece by piece: the signed fields (params.py), the prefill's answer and the decode's
reading of it (engine/first_token.py), and the proxy's choices (translate.py)."""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

from pdlaunch.engine.first_token import first_token_ids, first_token_logprob, skip_prefill_draw, with_first_token
from pdlaunch.engine.outputs import SamplingParams, TokenLogprob
from pdlaunch.engine.request import Request
from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.params import (
    JSONObject,
    PrefillAnswer,
    RemoteDecodeRequest,
    answer_json,
    check_kv_transfer_params,
    params_key,
    sign_kv_transfer_params,
)
from pdlaunch.proxy.translate import continues_from_first_token, ended_by_first_token, prefill_body
from tests.kv_transfer.deployment_secret import TEST_SECRET

KEY = params_key(TEST_SECRET)
ANSWER = {"do_remote_prefill": True, "remote_engine_id": "p", "remote_request_id": "r",
          "remote_block_ids": [[1, 2]], "remote_host": "127.0.0.1", "remote_port": 5600}


def _check(params: JSONObject) -> PrefillAnswer:
    checked = check_kv_transfer_params(params, KEY, max_blocks=8, lease_seconds=60, now=time.time())
    assert isinstance(checked, PrefillAnswer) and checked.model_dump(exclude_unset=True) == params
    return checked


def _prefill_request(kv: dict[str, bool], output: list[int]) -> Request:
    request = Request("r", [1, 2, 3], SamplingParams(max_tokens=1), 0, RemoteDecodeRequest.model_validate(kv))
    for t in output:
        request.append_output_token(t)
    return request


def test_prefill_signs_its_token_only_when_asked() -> None:
    logprob = TokenLogprob(7, -0.5, {7: -0.5, 9: float("-inf")})
    asked = with_first_token(PrefillAnswer.model_validate(ANSWER),
                             _prefill_request({"do_remote_decode": True, "return_first_token": True}, [7]), logprob)
    assert asked is not None and answer_json(asked)["first_token_ids"] == [7]
    assert answer_json(asked)["first_token_logprobs"] == [{"logprob": -0.5, "top": [
        {"token_id": 7, "logprob": -0.5}, {"token_id": 9, "logprob": -9999.0}]}]
    signed = sign_kv_transfer_params(answer_json(asked), KEY, 60, time.time())
    checked = _check(signed)
    assert first_token_ids(checked) == [7]
    assert first_token_logprob(checked, 7, 1) == TokenLogprob(7, -0.5, {7: -0.5})
    assert first_token_logprob(checked, 7, None) is None
    not_asked = with_first_token(PrefillAnswer.model_validate(ANSWER), _prefill_request({"do_remote_decode": True},
                                                                                        [7]), logprob)
    assert not_asked == PrefillAnswer.model_validate(ANSWER)


@pytest.mark.parametrize("change", [{"first_token_ids": [8]}, {"first_token_logprobs": [{"logprob": 0.0, "top": []}]}])
def test_a_changed_first_token_breaks_the_signature(change: dict[str, Any]) -> None:
    asked = with_first_token(PrefillAnswer.model_validate(ANSWER),
                             _prefill_request({"do_remote_decode": True, "return_first_token": True}, [7]),
                             TokenLogprob(7, -0.5, {}))
    assert asked is not None
    signed = sign_kv_transfer_params(answer_json(asked), KEY, 60, time.time())
    with pytest.raises(KVTransferError) as err:
        _check({**signed, **change})
    assert err.value.field == "kv_transfer_params.signature"


@pytest.mark.parametrize("bad", [[], [1, 2], ["1"], None])
def test_first_token_ids_shape_is_checked(bad: Any) -> None:
    params = sign_kv_transfer_params({**ANSWER, "first_token_ids": bad}, KEY, 60, time.time())
    if bad is None:
        _check(params)  # the same fields, parsed
        return
    with pytest.raises(KVTransferError) as err:
        _check(params)
    assert err.value.field.startswith("kv_transfer_params.first_token_ids")


def test_unsigned_params_give_no_first_token() -> None:
    assert first_token_ids(PrefillAnswer.model_validate({**ANSWER, "first_token_ids": [3]})) == []
    assert first_token_ids(RemoteDecodeRequest(do_remote_decode=True)) == []


def test_seeded_decode_skips_the_prefill_draw() -> None:
    """After the skip, the decode's generator is where colocated's is after sampling one token."""
    seeded = Request("r", [1], SamplingParams(temperature=1.0, seed=5), 0)
    seeded.generator = torch.Generator().manual_seed(5)
    colocated = torch.Generator().manual_seed(5)
    torch.empty(50).exponential_(generator=colocated)
    skip_prefill_draw(seeded, 50, torch.device("cpu"))
    assert torch.equal(torch.empty(50).exponential_(generator=seeded.generator),
                       torch.empty(50).exponential_(generator=colocated))
    greedy = Request("g", [1], SamplingParams(temperature=0.0, seed=5), 0)
    greedy.generator = torch.Generator().manual_seed(5)
    skip_prefill_draw(greedy, 50, torch.device("cpu"))  # greedy rows draw nothing
    assert torch.equal(greedy.generator.get_state(), torch.Generator().manual_seed(5).get_state())


def test_proxy_asks_for_the_first_token_only_where_the_decode_may_continue_from_it() -> None:
    assert continues_from_first_token({"prompt": "x", "max_tokens": 5, "n": 1})
    for body in ({"n": 2}, {"best_of": 3}, {"echo": True}, {"min_tokens": 2}, {"min_completion_tokens": 1}):
        assert not continues_from_first_token({"prompt": "x", **body})
    assert prefill_body({"prompt": "x"}, False, first_token=True)["kv_transfer_params"] == {
        "do_remote_decode": True, "return_first_token": True}
    assert prefill_body({"prompt": "x"}, False)["kv_transfer_params"] == {"do_remote_decode": True}


def _answer(reason: str, first: bool = True) -> dict[str, Any]:
    kv = {**ANSWER, **({"first_token_ids": [4]} if first else {})}
    return {"id": "cmpl-1", "choices": [{"index": 0, "text": "a", "finish_reason": reason}], "kv_transfer_params": kv}


def test_proxy_ends_at_the_prefill_answer_when_its_token_is_the_whole_answer() -> None:
    assert ended_by_first_token({"max_tokens": 8}, False, _answer("stop"))
    assert ended_by_first_token({"max_tokens": 1}, False, _answer("length"))
    assert ended_by_first_token({"max_completion_tokens": 1, "max_tokens": 9}, True, _answer("length"))
    assert not ended_by_first_token({"max_tokens": 8}, False, _answer("length"))
    assert not ended_by_first_token({"max_tokens": 1}, False, _answer("length", first=False))  # a vLLM prefill
