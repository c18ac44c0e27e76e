"""Where the proxy tokenizes a prompt (proxy/disaggregate.py PromptTokens.ids): on the event loop when what is left
to encode is short (a conversation's next turn, its earlier pieces kept), else in a worker thread; the ids and the
400s are an instance's either way."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import pytest

from pdlaunch.http.errors import OpenAIError
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy import disaggregate
from pdlaunch.proxy.disaggregate import PromptTokens
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.prompts import INLINE_CHAT_MESSAGES, INLINE_PROMPT_CHARS, tokenize


@pytest.fixture()
def threads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The names of the functions PromptTokens.ids hands to a worker thread."""
    handed: list[str] = []
    to_thread = asyncio.to_thread

    async def recorded(function: Callable[..., Any], *args: Any) -> Any:
        handed.append(function.__name__)
        return await to_thread(function, *args)

    monkeypatch.setattr(disaggregate.asyncio, "to_thread", recorded)
    return handed


def _instance_ids(body: dict[str, Any], chat: bool, template: str | None = None) -> list[int]:
    """What an instance computes for the body (server/prompts.tokenize with its own tokenizer)."""
    tokenizer = Tokenizer(resolve_model_path("tiny"))
    if template is not None:
        tokenizer.override_chat_template(template)
    if chat:
        return tokenize(tokenizer, ChatCompletionRequest.model_validate(body).template_messages())
    return tokenize(tokenizer, CompletionRequest.model_validate(body).single_prompt())


def _chat(messages: list[dict[str, str]]) -> dict[str, Any]:
    return {"model": "tiny", "messages": messages}


def test_a_conversations_turns_are_tokenized_on_the_event_loop_once_its_start_is_kept(threads: list[str]) -> None:
    tokens = PromptTokens(resolve_model_path("tiny"))
    messages = [{"role": "system", "content": "word " * (INLINE_PROMPT_CHARS // 5 + 100)}]  # past the bound alone
    handed: list[list[str]] = []
    for turn in range(3):
        messages.append({"role": "user", "content": f"question {turn} " * 40})
        body = _chat(list(messages))
        assert asyncio.run(tokens.ids(body, chat=True)) == _instance_ids(body, chat=True)
        handed.append(list(threads))
        threads.clear()
        messages.append({"role": "assistant", "content": f"answer {turn} " * 80})
    assert handed == [["tokenize"], [], []]  # the long system prompt once, then only the new turns' pieces


def test_short_prompts_stay_on_the_event_loop_and_long_or_many_go_to_a_thread(threads: list[str]) -> None:
    tokens = PromptTokens(resolve_model_path("tiny"))
    cases: list[tuple[dict[str, Any], bool, list[str]]] = [
        ({"model": "tiny", "prompt": "a short prompt"}, False, []),
        ({"model": "tiny", "prompt": [5, 6, 7]}, False, []),  # token ids: nothing to tokenize
        (_chat([{"role": "user", "content": "hi"}]), True, []),
        ({"model": "tiny", "prompt": "ab " * (INLINE_PROMPT_CHARS // 3 + 1)}, False, ["tokenize"]),
        (_chat([{"role": "user", "content": "hi"}] * (INLINE_CHAT_MESSAGES + 1)), True, ["ids_unless_too_long"]),
    ]
    for body, chat, expected in cases:
        threads.clear()
        assert asyncio.run(tokens.ids(body, chat)) == _instance_ids(body, chat)
        assert threads == expected, body


NO_SYSTEM = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system messages') }}{% endif %}"
             "{% for m in messages %}{{ m['content'] }}\n{% endfor %}")


@pytest.mark.parametrize(("body", "template"), [
    (_chat([{"role": "user", "content": "fine"}, {"role": "assistant", "content": "bad \ud800 text"}]), None),
    (_chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}]), NO_SYSTEM),
])
def test_a_prompt_an_instance_refuses_is_refused_alike(body: dict[str, Any], template: str | None) -> None:
    with pytest.raises(OpenAIError) as instance:
        _instance_ids(body, True, template)
    tokens = PromptTokens(resolve_model_path("tiny"), template)
    for _ in range(2):  # the second time with the prompt's valid pieces kept
        with pytest.raises(OpenAIError) as proxy:
            asyncio.run(tokens.ids(body, chat=True))
        assert (proxy.value.status, str(proxy.value), proxy.value.param) == \
            (instance.value.status, str(instance.value), instance.value.param) and proxy.value.status == 400


@pytest.mark.parametrize(("prompt", "hashed"), [([5, 6, 7], True), ([-1, 5], False), ([5, 2**63], False)])
def test_a_clients_token_ids_that_no_model_has_are_not_hashed(prompt: list[int], hashed: bool) -> None:
    from pdlaunch.proxy.prefix import PrefixRouter

    router = PrefixRouter(None, None, PromptTokens(resolve_model_path("tiny")), by_prefix=False)  # type: ignore[arg-type]
    blocks = asyncio.run(router.prompt({"model": "tiny", "prompt": prompt}, chat=False))
    assert (blocks is not None) == hashed and (blocks is None or blocks.token_ids == prompt)
    chat = asyncio.run(router.prompt(_chat([{"role": "user", "content": "hi"}]), chat=True))
    assert chat is not None and chat.token_ids == _instance_ids(_chat([{"role": "user", "content": "hi"}]), True)


def test_a_long_prompt_encoded_in_a_worker_thread_leaves_the_event_loop_free() -> None:
    """A long prompt goes to a worker thread so that the proxy's event loop relays every other stream meanwhile: the
    tokenizer's encode held the GIL throughout, so the loop stood still for the whole encode (86 s for a 9M-character
    prompt the instance would refuse by its size at once); the loop now runs while it encodes."""
    tokens = PromptTokens(resolve_model_path("tiny"))
    tokens.max_positions = None  # a checkpoint of unknown length: the tiny model's 2048 positions refuse these prompts

    async def encode(body: dict[str, Any]) -> tuple[list[int], float, float]:
        loop, gaps = asyncio.get_running_loop(), [0.0]

        async def tick() -> None:
            last = loop.time()
            while True:
                await asyncio.sleep(0.005)
                gaps.append(loop.time() - last)
                last = loop.time()

        ticker = asyncio.create_task(tick())
        await asyncio.sleep(0.05)
        started = loop.time()
        ids = await tokens.ids(body, chat=False)
        took = loop.time() - started
        ticker.cancel()
        return ids, took, max(gaps)

    # 345,000 characters take ~1 s on a loaded 2-core machine; a faster one gets a longer prompt, so that the encode
    # lasts long enough to tell a held loop from a free one
    for repeats in (15_000, 60_000, 240_000):
        body = {"model": "tiny", "prompt": "hello world foo bar x1 " * repeats}
        ids, took, longest_gap = asyncio.run(encode(body))
        if took > 0.2:
            break
    assert ids == _instance_ids(body, chat=False)
    assert took > 0.2, f"the encode took {took:.2f}s: too short to tell a held loop from a free one"
    assert longest_gap < took / 2, f"the event loop stood still {longest_gap:.2f}s of the encode's {took:.2f}s"
