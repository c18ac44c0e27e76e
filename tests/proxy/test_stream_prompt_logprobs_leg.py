"""A stream's `prompt_logprobs: 0` (the only value a stream may send, as vLLM takes it) asks for nothing: its chunks
carry no prompt logprobs, and a colocated instance computes none. Through PD the prefill leg is not streamed, so the
field must not go along: the prefill would compute them (no prefix-cache hit for the prompt, an eager step) for an
answer the proxy drops; and the prefix policy must not treat the request as one that computes them."""

from __future__ import annotations

import pytest

from pdlaunch.proxy.prefix import wants_prompt_logprobs
from pdlaunch.proxy.translate import prefill_body


@pytest.mark.parametrize("chat", [False, True])
def test_a_streams_prompt_logprobs_0_does_not_go_to_the_prefill(chat: bool) -> None:
    body = {"stream": True, "prompt_logprobs": 0, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                      else {"prompt": "hi"})}
    assert "prompt_logprobs" not in prefill_body(body, chat)
    assert not wants_prompt_logprobs(body, chat)


@pytest.mark.parametrize("chat", [False, True])
def test_a_whole_answers_prompt_logprobs_still_go_to_the_prefill(chat: bool) -> None:
    body = {"stream": False, "prompt_logprobs": 0, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                       else {"prompt": "hi"})}
    assert prefill_body(body, chat)["prompt_logprobs"] == 0
    assert wants_prompt_logprobs(body, chat)
