"""What a PD decode leg refuses that its prefill leg (one token, not streamed, without n / best_of / echo / min_tokens:
proxy/translate.prefill_body) would not: every field the prefill leg changes or drops is either checked by the proxy
on the client's whole body before any leg (translate.parse_client_body, the instances' own models), or carried to the
prefill as `decode_limits` and checked there against the prompt's tokens before it computes (server/decode_limits.py),
with the decode's own 400. The e2e test (test_pd_decode_limits_e2e.py) compares those 400s with a real decode's."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from pdlaunch.http.errors import OpenAIError, validation_error
from pdlaunch.proxy.translate import DECODE_LIMITS, parse_client_body, prefill_body
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.choice_limits import check_choice_count
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.decode_limits import check_decode_leg, decode_leg_refusal
from pdlaunch.server.request_fields import DecodeLimits

MAX_MODEL_LEN = 256
VOCAB = 1000
MESSAGES = [{"role": "user", "content": "hi"}]

# Every field the prefill leg changes or drops, and who refuses what the decode would refuse for it.
BY_PREFILL = {"max_tokens", "max_completion_tokens", "min_tokens"}  # against the prompt's tokens: decode_limits
BY_PROXY = {  # from the client's body alone: parse_client_body
    "max_tokens", "max_completion_tokens", "min_tokens", "n", "best_of", "echo", "stream", "stream_options"}
BY_NEITHER = {"min_completion_tokens"}  # no field of ours (nor vLLM's): ignored by every instance, the decode too


def _changed(body: dict[str, Any], chat: bool) -> set[str]:
    leg = prefill_body(body, chat, first_token=True, decode_limits=True)
    return {k for k in body if leg.get(k) != body[k]}


def test_every_field_the_prefill_leg_changes_is_checked_before_the_prefill_computes() -> None:
    completion = {"model": "m", "prompt": "p", "max_tokens": 9, "min_tokens": 2, "n": 2, "best_of": 3, "echo": True,
                  "stream": True, "stream_options": {"include_usage": True}, "min_completion_tokens": 1,
                  "temperature": 0.5, "stop": ["x"], "seed": 3, "logprobs": 2}
    chat = {"model": "m", "messages": MESSAGES, "max_tokens": 9, "max_completion_tokens": 8, "min_tokens": 2, "n": 2,
            "stream": True, "stream_options": {"include_usage": True}, "logprobs": True, "top_logprobs": 2}
    for body, is_chat in ((completion, False), (chat, True)):
        changed = _changed(body, is_chat)
        assert changed == (set(body) & (BY_PREFILL | BY_PROXY | BY_NEITHER)), changed
        assert "kv_transfer_params" not in body  # the leg's own: the client's is not passed on


def test_the_leg_carries_the_limits_as_the_client_sent_them() -> None:
    leg = prefill_body({"prompt": "p", "max_tokens": 50, "min_tokens": 3, "n": 2}, chat=False, decode_limits=True)
    assert leg["max_tokens"] == 1 and "min_tokens" not in leg
    assert leg[DECODE_LIMITS] == {"max_tokens": 50, "min_tokens": 3}
    assert prefill_body({"prompt": "p"}, chat=False, decode_limits=True)[DECODE_LIMITS] == {}  # 16, the decode's
    chat = prefill_body({"messages": MESSAGES, "max_tokens": None, "max_completion_tokens": 7}, chat=True,
                        decode_limits=True)
    assert chat[DECODE_LIMITS] == {"max_tokens": None, "max_completion_tokens": 7}
    # vLLM's instances (a proxy without the deployment secret) get the leg as vLLM's proxies send it.
    assert DECODE_LIMITS not in prefill_body({"prompt": "p", "max_tokens": 50}, chat=False)


def _refusal(check: Callable[[], object]) -> OpenAIError | None:
    """The 400 `check` answers (a pydantic error as an instance turns it into one), or None."""
    try:
        check()
    except ValidationError as exc:
        return validation_error(exc)
    except OpenAIError as exc:
        return exc
    return None


def _instance(body: dict[str, Any], chat: bool) -> OpenAIError | None:
    """What an instance (the decode too) refuses of `body` before it counts the prompt's tokens: its model, the
    number of choices, the sampling fields (server/completions.py, server/choices.py)."""
    def check() -> None:
        request = (ChatCompletionRequest if chat else CompletionRequest).model_validate(body)
        n = request.n
        best_of = request.best_of if isinstance(request, CompletionRequest) and request.best_of else n
        check_choice_count(1, n, best_of)
        request.sampling_params()
    return _refusal(check)


# One body per field the leg drops or changes that the decode refuses from the body alone (decode's param, chat?)
BODY_REFUSALS: list[tuple[dict[str, Any], bool, str]] = [
    ({"prompt": "p", "n": 0}, False, "n"),
    ({"prompt": "p", "n": 129}, False, "n"),
    ({"prompt": "p", "n": 3, "best_of": 2}, False, "best_of"),
    ({"prompt": "p", "n": 1, "best_of": 2, "stream": True}, False, "best_of"),
    ({"prompt": "p", "echo": "yes"}, False, "echo"),
    ({"prompt": "p", "echo": True, "max_tokens": 0, "stream": True}, False, "stream"),
    ({"prompt": "p", "echo": True, "max_tokens": 0, "min_tokens": 1}, False, "min_tokens"),
    ({"prompt": "p", "max_tokens": 0}, False, "max_tokens"),
    ({"prompt": "p", "max_tokens": 2**31}, False, "max_tokens"),
    ({"prompt": "p", "max_tokens": 4, "min_tokens": 5}, False, "min_tokens"),
    ({"prompt": "p", "min_tokens": -1}, False, "min_tokens"),
    ({"prompt": "p", "stream": "yes"}, False, "stream"),
    ({"prompt": "p", "stream_options": {"include_usage": True}}, False, "stream_options"),
    ({"prompt": "p", "stream": True, "stream_options": {"continuous_usage_stats": True}}, False,
     "stream_options.continuous_usage_stats"),
    ({"prompt": "p", "stream": True, "prompt_logprobs": 1}, False, "prompt_logprobs"),
    ({"prompt": "p", "stream": True, "prompt_logprobs": 0}, False, "prompt_logprobs"),
    ({"messages": MESSAGES, "stream": True, "prompt_logprobs": 0}, True, "prompt_logprobs"),
    ({"messages": MESSAGES, "max_completion_tokens": 0}, True, "max_completion_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": 4, "max_tokens": -1}, True, "max_tokens"),
    ({"messages": MESSAGES, "max_completion_tokens": 4, "min_tokens": 5}, True, "min_tokens"),
    ({"messages": MESSAGES, "n": 0}, True, "n"),
]


@pytest.mark.parametrize(("body", "chat", "param"), BODY_REFUSALS)
def test_the_proxy_refuses_from_the_body_what_the_decode_would(body: dict[str, Any], chat: bool, param: str) -> None:
    decode = _instance(body, chat)
    assert decode is not None and decode.status == 400 and decode.param == param, decode and decode.message
    assert _instance(prefill_body(body, chat), chat) is None  # the one-token leg alone passes: only the decode refuses
    proxy = _refusal(lambda: parse_client_body(json.dumps(body).encode(), chat))
    assert proxy is not None
    assert (proxy.status, proxy.message, proxy.param) == (decode.status, decode.message, decode.param)


# (the client's body, chat?, the prompt's tokens, the decode's 400: message and param; None: it takes the request)
PROMPT_REFUSALS: list[tuple[dict[str, Any], bool, int, tuple[str, str] | None]] = [
    ({"max_tokens": 250}, False, 10, ("prompt (10 tokens) + max_tokens (250) = 260 exceeds max_model_len 256 "
                                      "(shorten the prompt or lower max_tokens)", "prompt")),
    ({"max_tokens": 246}, False, 10, None),
    ({}, False, 241, ("prompt (241 tokens) + max_tokens (16) = 257 exceeds max_model_len 256 "
                      "(shorten the prompt or lower max_tokens)", "prompt")),
    ({}, False, 240, None),
    ({"max_tokens": 0, "echo": True}, False, 255, None),  # echo's prompt alone: one token sampled, left out
    ({"max_tokens": None, "min_tokens": 200}, False, 60, ("min_tokens (200) does not fit: the prompt has 60 tokens "
                                                          "and a request may reach 256", "min_tokens")),
    ({"max_tokens": None, "min_tokens": 196}, False, 60, None),
    ({"max_completion_tokens": 250}, True, 26, ("prompt (26 tokens) + max_completion_tokens (250) = 276 exceeds "
                                                "max_model_len 256 (shorten the messages or lower "
                                                "max_completion_tokens)", "messages")),
    ({"max_completion_tokens": 250, "max_tokens": 1}, True, 26, (
        "prompt (26 tokens) + max_completion_tokens (250) = 276 exceeds max_model_len 256 (shorten the messages or "
        "lower max_completion_tokens)", "messages")),
    ({"max_completion_tokens": 1, "max_tokens": 250}, True, 26, None),  # max_completion_tokens sets the limit
    ({"max_tokens": 250}, True, 22, ("prompt (22 tokens) + max_tokens (250) = 272 exceeds max_model_len 256 "
                                     "(shorten the messages or lower max_tokens)", "messages")),
    ({"min_tokens": 300}, True, 26, ("min_tokens (300) does not fit: the prompt has 26 tokens and a request may "
                                     "reach 256", "min_tokens")),
    ({"min_tokens": 230}, True, 26, None),
]


@pytest.mark.parametrize(("fields", "chat", "prompt_len", "refused"), PROMPT_REFUSALS)
def test_the_prefill_refuses_for_its_decode_leg(fields: dict[str, Any], chat: bool, prompt_len: int,
                                                refused: tuple[str, str] | None) -> None:
    """The leg as the prefill parses it (its model), checked against a prompt of `prompt_len` tokens."""
    body = {"model": "m", **({"messages": MESSAGES} if chat else {"prompt": "p"}), **fields}
    assert _refusal(lambda: parse_client_body(json.dumps(body).encode(), chat)) is None  # the proxy passes it on
    leg = (ChatCompletionRequest if chat else CompletionRequest).model_validate(
        prefill_body(body, chat, first_token=True, decode_limits=True))
    assert leg.decode_limits is not None
    refusal = decode_leg_refusal(leg.decode_limits, chat, [7] * prompt_len, MAX_MODEL_LEN, VOCAB)
    assert (refusal and (refusal.status, refusal.message, refusal.param)) == (refused and (400, *refused))
    if refused is not None:
        with pytest.raises(OpenAIError, match=r"^(prompt|min_tokens) \("):  # a list's prompt it refuses
            check_decode_leg(leg.decode_limits, chat, [[7], [7] * prompt_len], MAX_MODEL_LEN, VOCAB)


def test_a_prompt_the_engine_refuses_for_its_ids_is_left_to_the_engine() -> None:
    """The decode's engine refuses an empty prompt, or an id outside the vocabulary, before it compares prompt +
    max_tokens with max_model_len; the prefill's engine makes the same checks and answers the same 400. A request
    without a limit has its min_tokens checked before the engine, on the decode as here."""
    too_long = DecodeLimits(max_tokens=250)
    assert decode_leg_refusal(too_long, False, [7] * 10, MAX_MODEL_LEN, VOCAB) is not None
    assert decode_leg_refusal(too_long, False, [7] * 9 + [VOCAB], MAX_MODEL_LEN, VOCAB) is None
    assert decode_leg_refusal(too_long, False, [-1] + [7] * 9, MAX_MODEL_LEN, VOCAB) is None
    assert decode_leg_refusal(DecodeLimits(max_tokens=300), False, [], MAX_MODEL_LEN, VOCAB) is None
    no_room = DecodeLimits(max_tokens=None, min_tokens=300)
    refusal = decode_leg_refusal(no_room, False, [VOCAB] * 10, MAX_MODEL_LEN, VOCAB)
    assert refusal is not None and refusal.param == "min_tokens"


def test_without_limits_nothing_is_checked() -> None:
    check_decode_leg(None, False, [[7] * 10**4], MAX_MODEL_LEN, VOCAB)
    check_decode_leg(DecodeLimits(), False, [[7]], MAX_MODEL_LEN, VOCAB)


@pytest.mark.parametrize(("limits", "param"), [
    ({"max_tokens": "5"}, "decode_limits.max_tokens"),
    ({"max_tokens": -1}, "decode_limits.max_tokens"),
    ({"min_tokens": True}, "decode_limits.min_tokens"),
    ({"n": 2}, "decode_limits.n"),
    ([], "decode_limits"),
])
def test_decode_limits_from_outside_are_validated(limits: object, param: str) -> None:
    refusal = _refusal(lambda: CompletionRequest.model_validate({"prompt": "p", DECODE_LIMITS: limits}))
    assert refusal is not None and (refusal.status, refusal.param) == (400, param), refusal and refusal.message


@pytest.mark.parametrize("chat", [False, True])
@pytest.mark.parametrize("asked", [0, 1])
def test_a_streams_prompt_logprobs_are_refused_by_the_proxy_before_any_leg(chat: bool, asked: int) -> None:
    """A stream's chunks carry no prompt logprobs: any value, 0 (which vLLM takes and answers nothing for) too, is the
    proxy's 400 before a leg is sent, as a colocated instance's (server/request_fields.py)."""
    base: dict[str, Any] = {"model": "m", "stream": True, **({"messages": MESSAGES} if chat else {"prompt": "p"})}
    refusal = _refusal(lambda: parse_client_body(json.dumps({**base, "prompt_logprobs": asked}).encode(), chat))
    assert refusal is not None and (refusal.status, refusal.param) == (400, "prompt_logprobs"), refusal
