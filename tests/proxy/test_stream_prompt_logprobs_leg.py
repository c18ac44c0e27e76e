"""A whole answer's `prompt_logprobs` go along to the prefill leg (it computes the prompt) and count for the prefix
policy; a stream's are refused before any leg, by the proxy's check of the client's body as the instances refuse
them (server/request_fields.py): its chunks carry none."""

from __future__ import annotations

import json

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.prefix import wants_prompt_logprobs
from pdlaunch.proxy.translate import parse_client_body, prefill_body


@pytest.mark.parametrize("chat", [False, True])
def test_a_whole_answers_prompt_logprobs_still_go_to_the_prefill(chat: bool) -> None:
    body = {"stream": False, "prompt_logprobs": 0, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                       else {"prompt": "hi"})}
    assert prefill_body(body, chat)["prompt_logprobs"] == 0
    assert wants_prompt_logprobs(body, chat)


@pytest.mark.parametrize("chat", [False, True])
def test_a_streams_prompt_logprobs_0_is_refused_before_any_leg(chat: bool) -> None:
    body = {"stream": True, "prompt_logprobs": 0, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                      else {"prompt": "hi"})}
    with pytest.raises(OpenAIError) as refused:
        parse_client_body(json.dumps(body).encode(), chat)
    assert refused.value.status == 400 and refused.value.param == "prompt_logprobs", refused.value
