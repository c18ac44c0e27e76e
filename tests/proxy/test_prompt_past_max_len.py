"""A prompt no instance can take by its size (server/prompts.check_prompt_size under the checkpoint's
max_position_embeddings, the most max_model_len an instance of it may have) is not tokenized by the proxy: the
instance refuses it with its 400 at once, while the proxy's encode of it took a worker thread and a core for as long
as the instance would have (86 s for a 9M-character prompt). The answer stays the instance's; only the routing
goes without the prompt's token ids (the pool's policy)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request

from pdlaunch.config.model_info import load_model_info
from pdlaunch.http.errors import OpenAIError
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.prompts import MAX_PROMPT_CHARS_PER_TOKEN, check_prompt_size


def _max_positions() -> int:
    info, _ = load_model_info(str(resolve_model_path("tiny")))
    assert info is not None and info.max_position_embeddings is not None
    return info.max_position_embeddings


class SizeCheckingInstance:
    """Refuses a prompt by its size as an instance does (check_prompt_size at the model's whole length), else
    answers; records the prompts' lengths it was sent."""

    def __init__(self, role: str) -> None:
        self.role, self.sent = role, list[int]()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok", "role": role})
        self.app.post("/v1/completions")(self.answer)
        self.app.post("/v1/chat/completions")(self.answer)

    async def answer(self, request: Request) -> Any:
        body = await request.json()
        chat = "messages" in body
        prompt = ChatCompletionRequest.model_validate(body).template_messages() if chat else \
            CompletionRequest.model_validate(body).single_prompt()
        self.sent.append(len(str(body.get("messages") or body.get("prompt"))))
        try:
            check_prompt_size(prompt, _max_positions())
        except OpenAIError as exc:
            return exc.response()
        params = {"do_remote_prefill": True, "remote_request_id": "held-0"} if self.role == "prefill" else None
        return {"id": "x", "object": "text_completion", "created": 1, "model": "tiny",
                "choices": [{"index": 0, "text": "ok", "finish_reason": "length"}], "kv_transfer_params": params}


@pytest.fixture()
def encoded(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The length of every text the proxy's tokenizer encodes."""
    lengths: list[int] = []
    encode = Tokenizer.encode

    def recorded(self: Tokenizer, text: str, *args: Any, **kwargs: Any) -> list[int]:
        lengths.append(len(text))
        return encode(self, text, *args, **kwargs)

    monkeypatch.setattr(Tokenizer, "encode", recorded)
    return lengths


@contextmanager
def _proxy() -> Iterator[str]:
    from tests.serving.helpers import ThreadServer, wait_for

    ports = PortAllocator("127.0.0.1")
    with ExitStack() as stack:
        instances = [Instance(role, stack.enter_context(ThreadServer(SizeCheckingInstance(role).app,
                                                                     ports.free(role))).url, f"{role}-0")
                     for role in ("prefill", "decode")]
        pool = InstancePool(instances, "prefix")
        app = build_proxy_app(pool, 60.0, tokenizer_dir=resolve_model_path("tiny"))
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to take every instance")
        yield proxy.url


def test_a_prompt_past_every_max_model_len_gets_the_instances_400_untokenized(encoded: list[int]) -> None:
    bound = _max_positions() * MAX_PROMPT_CHARS_PER_TOKEN
    long_text = "word " * (bound // 5 + 1000)
    chat_text = "x" * (bound + 10)
    with _proxy() as url:
        short = httpx.post(f"{url}/v1/completions", json={"model": "tiny", "prompt": "a short prompt"}, timeout=60)
        assert short.status_code == 200, short.text
        assert any(n >= len("a short prompt") for n in encoded)  # a prompt that may fit is tokenized (prefix routing)
        for path, body in (("/v1/completions", {"model": "tiny", "prompt": long_text}),
                           ("/v1/chat/completions", {"model": "tiny",
                                                     "messages": [{"role": "user", "content": chat_text}]})):
            answer = httpx.post(f"{url}{path}", json=body, timeout=60)
            assert answer.status_code == 400, answer.text
            assert f"max_model_len {_max_positions()}" in answer.json()["error"]["message"]  # the instance's 400
    assert max(encoded) < bound, f"the proxy tokenized a prompt of {max(encoded)} characters (bound {bound})"


def test_disaggregation_sends_such_a_prompt_pd_uncounted(encoded: list[int]) -> None:
    """Per-request disaggregation counts no tokens of it: the PD path, whose prefill answers the 400."""
    import asyncio

    from pdlaunch.proxy.disaggregate import PD, Disaggregation

    bound = _max_positions() * MAX_PROMPT_CHARS_PER_TOKEN
    decider = Disaggregation(100, resolve_model_path("tiny"))
    assert asyncio.run(decider.decide({"model": "tiny", "prompt": "y" * (bound + 1)}, chat=False)) == (PD, None)
    assert asyncio.run(decider.decide({"model": "tiny", "prompt": "y" * 100}, chat=False))[1] is not None
    assert max(encoded) < bound
