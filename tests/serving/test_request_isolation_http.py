"""Over HTTP, a request whose own per-request work raises inside an engine step (here: its bad words cannot be
tokenized) gets a 500 JSON error (an error event when streamed) while a request in the same batch completes as it
would alone, and the instance stays healthy with every KV block free (tiny model on CPU, in process)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated, wait_for


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    with in_process_instance(tiny_colocated(512), "test-isolation-0") as served:
        yield served


def body(**extra: Any) -> dict[str, Any]:
    return {"model": "tiny", "prompt": "The capital of France is", "max_tokens": 16, "temperature": 0.0,
            "ignore_eos": True, **extra}


async def post_all(url: str, bodies: list[dict[str, Any]]) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=120) as client:
        return list(await asyncio.gather(*(client.post(f"{url}/v1/completions", json=b) for b in bodies)))


def test_a_failing_request_gets_its_error_and_its_batch_goes_on(instance: tuple[str, EngineLoop],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    url, loop = instance
    alone = httpx.post(f"{url}/v1/completions", json=body(), timeout=120)
    assert alone.status_code == 200, alone.text
    processors = loop.engine.sampler.processors
    encode = processors._encode
    assert encode is not None

    def raising(text: str) -> list[int]:
        if "boom" in text:
            raise RuntimeError("injected bad_words failure")
        return encode(text)

    monkeypatch.setattr(processors, "_encode", raising)  # read on the engine thread at its next sample
    normal, failed, streamed = asyncio.run(post_all(url, [
        body(), body(bad_words=["boom"]), body(bad_words=["boom"], stream=True)]))

    assert normal.status_code == 200 and normal.json()["choices"] == alone.json()["choices"]
    assert failed.status_code == 500, failed.text
    error = failed.json()["error"]
    assert "injected bad_words failure" in error["message"] and "Traceback" not in error["message"]
    assert streamed.status_code == 200  # the stream had started: its error comes as an event
    events = parse_sse(streamed.content)
    assert events[-1] == "[DONE]" and "injected bad_words failure" in json.loads(events[-2])["error"]["message"]

    assert httpx.get(f"{url}/health", timeout=30).json()["status"] == "ok"
    wait_for(lambda: httpx.get(f"{url}/info", timeout=30).json()["num_blocks_used"] == 0,
             "every KV block back on the free list")
    again = httpx.post(f"{url}/v1/completions", json=body(), timeout=120)
    assert again.status_code == 200 and again.json()["choices"] == alone.json()["choices"]
