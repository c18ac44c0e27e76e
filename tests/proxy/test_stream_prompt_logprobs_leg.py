"""A whole answer's `prompt_logprobs` go along to the prefill leg (it computes the prompt) and count for the prefix
policy. A stream's are refused before any leg (tests/serving/test_pd_decode_limits.py)."""

from __future__ import annotations

import pytest

from pdlaunch.proxy.prefix import wants_prompt_logprobs
from pdlaunch.proxy.translate import prefill_body


@pytest.mark.parametrize("chat", [False, True])
def test_a_whole_answers_prompt_logprobs_still_go_to_the_prefill(chat: bool) -> None:
    body = {"stream": False, "prompt_logprobs": 0, **({"messages": [{"role": "user", "content": "hi"}]} if chat
                                                       else {"prompt": "hi"})}
    assert prefill_body(body, chat)["prompt_logprobs"] == 0
    assert wants_prompt_logprobs(body, chat)

