"""A request that the KV cache of its decode can never hold (more blocks than that cache has in all) is refused by its
prefill leg before it computes, with the decode's own 400: what decides it (engine/kv_capacity.py) comes from the
decode's /health to the proxy (proxy/instances.py), goes on the prefill leg as decode_limits.kv_cache
(proxy/translate.py) and is checked there against the prompt's tokens (server/decode_limits.py). The e2e test
(test_pd_decode_kv_size_e2e.py) compares those 400s with a real decode's."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from pdlaunch.engine.kv_capacity import KVCapacity, window_blocks
from pdlaunch.http.errors import OpenAIError, validation_error
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.translate import DECODE_LIMITS, KV_CACHE, parse_client_body, prefill_body
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.decode_limits import check_decode_leg, decode_leg_refusal
from pdlaunch.server.request_fields import DecodeLimits

MAX_MODEL_LEN = 256
VOCAB = 1000
MESSAGES = [{"role": "user", "content": "hi"}]
SMALL = KVCapacity(num_blocks=16, block_size=8)  # 128 tokens of one request, under a max_model_len of 256
KV_400 = "the request needs up to {} KV blocks but the cache has 16 (shorten the request or give the KV cache more " \
         "memory)"


def test_blocks_needed_full_attention_and_sliding_windows() -> None:
    assert [SMALL.blocks_needed(n) for n in (1, 8, 9, 128, 129)] == [1, 1, 2, 16, 17]
    assert SMALL.refusal(128) is None
    refusal = SMALL.refusal(129)
    assert refusal is not None and (refusal.message, refusal.field) == (
        "the request needs up to 17 KV blocks but the cache has 16", "prompt")
    assert SMALL.longest(MAX_MODEL_LEN) == 128 and SMALL.longest(100) == 100
    sliding = KVCapacity(num_blocks=16, block_size=8, window_blocks=10)  # every group sliding: at most 10 blocks
    assert sliding.blocks_needed(10**6) == 10 and sliding.refusal(10**6) is None
    assert sliding.longest(MAX_MODEL_LEN) == MAX_MODEL_LEN  # no full-attention group bounds a request


def test_window_blocks_is_the_most_a_sliding_group_holds() -> None:
    assert window_blocks([None], 16, 2048) is None
    assert window_blocks([4096, None], 16, 2048) is None  # a full-attention group holds the whole request
    assert window_blocks([4096], 16, 2048) == (2048 + 4096) // 16 + 1
    assert window_blocks([100, 4096], 16, 2000) == -(-(2000 + 4096) // 16) + 1


def _limits(fields: dict[str, Any], chat: bool, cache: KVCapacity | None = SMALL) -> DecodeLimits:
    """The decode limits of the prefill leg of a client body with `fields`, as the prefill parses them."""
    body = {"model": "m", **({"messages": MESSAGES} if chat else {"prompt": "p"}), **fields}
    parse_client_body(json.dumps(body).encode(), chat)  # the proxy passes it on
    leg = prefill_body(body, chat, first_token=True, decode_limits=True, decode_kv_cache=cache)
    limits = (ChatCompletionRequest if chat else CompletionRequest).model_validate(leg).decode_limits
    assert limits is not None and limits.kv_cache == cache
    return limits


# (the client's body, chat?, the prompt's tokens, the decode's 400: message and param; None: the decode takes it)
REFUSALS: list[tuple[dict[str, Any], bool, int, tuple[str, str] | None]] = [
    ({"max_tokens": 200}, False, 20, (KV_400.format(28), "prompt")),
    ({"max_tokens": 108}, False, 20, None),  # 128 tokens: all 16 blocks
    ({"max_tokens": 109}, False, 20, (KV_400.format(17), "prompt")),
    ({}, False, 113, (KV_400.format(17), "prompt")),  # 16 tokens without the field
    ({"max_tokens": 0, "echo": True}, False, 128, (KV_400.format(17), "prompt")),  # echo: one token sampled
    ({"max_completion_tokens": 200}, True, 20, (KV_400.format(28), "messages")),
    ({"max_tokens": 200}, True, 20, (KV_400.format(28), "messages")),
    # past max_model_len too: that refusal comes first, as in the decode's engine
    ({"max_tokens": 250}, False, 20, ("prompt (20 tokens) + max_tokens (250) = 270 exceeds max_model_len 256 "
                                      "(shorten the prompt or lower max_tokens)", "prompt")),
    # No limit: the room its prompt leaves of the 128 tokens a request may reach there, at least one token.
    ({}, True, 127, None),
    ({}, True, 128, (KV_400.format(17), "messages")),
    ({"max_tokens": None}, False, 200, (KV_400.format(26), "prompt")),
    ({"max_tokens": None}, False, 256, None),  # past max_model_len: the prefill's one-token leg is refused as well
    ({"min_tokens": 108}, True, 20, None),
    ({"min_tokens": 109}, True, 20, ("min_tokens (109) does not fit: the prompt has 20 tokens and a request may "
                                     "reach 128", "min_tokens")),
]


@pytest.mark.parametrize(("fields", "chat", "prompt_len", "refused"), REFUSALS)
def test_the_prefill_refuses_what_the_decode_s_kv_cache_would(fields: dict[str, Any], chat: bool, prompt_len: int,
                                                              refused: tuple[str, str] | None) -> None:
    limits = _limits(fields, chat)
    refusal = decode_leg_refusal(limits, chat, [7] * prompt_len, MAX_MODEL_LEN, VOCAB)
    assert (refusal and (refusal.status, refusal.message, refusal.param)) == (refused and (400, *refused))
    if refused is not None:
        with pytest.raises(OpenAIError) as raised:  # the first of a list's prompts it refuses
            check_decode_leg(limits, chat, [[7] * prompt_len, [7]], MAX_MODEL_LEN, VOCAB)
        assert raised.value.message == refused[0]


def test_without_the_decode_s_kv_cache_it_is_left_to_the_decode() -> None:
    """A decode whose /health the proxy has not read (or that reports no kv_capacity): no KV refusal, and the room of
    a request without a limit is checked against max_model_len, as before the decode's cache was known."""
    assert decode_leg_refusal(_limits({"max_tokens": 200}, False, None), False, [7] * 20, MAX_MODEL_LEN, VOCAB) is None
    assert decode_leg_refusal(_limits({"min_tokens": 200}, True, None), True, [7] * 20, MAX_MODEL_LEN, VOCAB) is None


def test_a_prompt_the_engine_refuses_for_its_ids_is_left_to_the_engine() -> None:
    """The decode's engine checks the prompt's ids before its size; the prefill's engine answers the same 400."""
    limits = _limits({"max_tokens": 200}, False)
    assert decode_leg_refusal(limits, False, [7] * 19 + [VOCAB], MAX_MODEL_LEN, VOCAB) is None
    assert decode_leg_refusal(limits, False, [], MAX_MODEL_LEN, VOCAB) is None


def test_only_our_instances_get_the_decode_s_kv_cache() -> None:
    body = {"prompt": "p", "max_tokens": 5}
    assert prefill_body(body, False, decode_limits=True, decode_kv_cache=SMALL)[DECODE_LIMITS] == {
        "max_tokens": 5, KV_CACHE: {"num_blocks": 16, "block_size": 8, "window_blocks": None}}
    assert KV_CACHE not in prefill_body(body, False, decode_limits=True)[DECODE_LIMITS]
    assert DECODE_LIMITS not in prefill_body(body, False, decode_kv_cache=SMALL)  # vLLM's: as vLLM's proxies send it


@pytest.mark.parametrize(("kv_cache", "param"), [
    ({"num_blocks": 0, "block_size": 8}, "decode_limits.kv_cache.num_blocks"),
    ({"num_blocks": "16", "block_size": 8}, "decode_limits.kv_cache.num_blocks"),
    ({"num_blocks": 16, "block_size": 8, "window_blocks": -1}, "decode_limits.kv_cache.window_blocks"),
    ({"num_blocks": 16}, "decode_limits.kv_cache.block_size"),
    ({"num_blocks": 16, "block_size": 8, "spare": 1}, "decode_limits.kv_cache.spare"),
    ([16, 8], "decode_limits.kv_cache"),
])
def test_the_kv_cache_of_a_leg_is_validated(kv_cache: object, param: str) -> None:
    with pytest.raises(ValidationError) as raised:
        CompletionRequest.model_validate({"prompt": "p", DECODE_LIMITS: {KV_CACHE: kv_cache}})
    refusal = validation_error(raised.value)
    assert (refusal.status, refusal.param) == (400, param), refusal.message


def _probe(instance: Instance, body: dict[str, object]) -> None:
    """One health probe of `instance`, whose /health answers 200 with `body`."""
    async def probe() -> None:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, json=body))
        async with httpx.AsyncClient(transport=transport) as client:
            await InstancePool([instance]).check_all(client)

    asyncio.run(probe())


def test_the_proxy_reads_a_decode_s_kv_cache_from_its_health() -> None:
    decode = Instance("decode", "http://d:1", "decode-0")
    health: dict[str, object] = {"status": "ok", "role": "decode", "engine_id": "e"}
    _probe(decode, {**health, "kv_capacity": {"num_blocks": 16, "block_size": 8, "window_blocks": None}})
    assert (decode.state, decode.kv_capacity) == ("ready", SMALL)
    # Not one (another server, a value out of range): none, and the decode checks its own cache.
    for said in ({"num_blocks": -1, "block_size": 8}, "16 blocks", {"num_blocks": 16, "block_size": 8, "x": 1}):
        _probe(decode, {**health, "kv_capacity": said})
        assert (decode.state, decode.kv_capacity) == ("ready", None)
    _probe(decode, {**health, "kv_capacity": {"num_blocks": 32, "block_size": 8}})  # a restart with another cache
    assert decode.kv_capacity == KVCapacity(num_blocks=32, block_size=8)
    _probe(decode, health)
    assert decode.kv_capacity is None
