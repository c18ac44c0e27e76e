"""End to end: `pdlaunch serve` 1P1D on CPU with a random HF checkpoint, driven by the openai client.

One deployment for the module; the last test SIGKILLs its decode instance mid-stream.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from tests.helpers.checkpoints import hf_greedy
from tests.serving.e2e import Serve, alive, wait_gone

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def serve(llama_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    tmp = tmp_path_factory.mktemp("e2e-pd")
    config = tmp / "no-restart.yaml"  # the last test checks that a death stops serve when restarts are off
    config.write_text("supervision: {max_restarts: 0}\n")
    deployment = Serve(tmp, [
        str(config), "--model", str(llama_ckpt), "--prefill", "1", "--decode", "1", "--num-gpu-blocks", "512",
        "--max-num-seqs", "64"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


@pytest.fixture(scope="module")
def client(serve: Serve) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)


def test_instances_and_kv_moved(serve: Serve, client: openai.OpenAI) -> None:
    instances = httpx.get(f"{serve.url}/instances", timeout=5).json()
    assert sorted((i["role"], i["state"]) for i in instances) == [("decode", "ready"), ("prefill", "ready")]
    client.completions.create(model=str(serve_model(serve)), prompt=PROMPT * 8, max_tokens=4, temperature=0)
    moved = 0.0
    for url in serve.instance_urls().values():
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("pdlaunch_kv_transfer_bytes_total "):
                moved += float(line.split()[1])
    assert moved > 0, "the decode instance did not receive KV over NIXL"


def serve_model(serve: Serve) -> str:
    return httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]


def test_openai_client_completions_chat_and_streams(serve: Serve, client: openai.OpenAI) -> None:
    model = serve_model(serve)
    whole = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0)
    assert whole.choices[0].text and whole.usage.completion_tokens > 0
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    messages = [{"role": "user", "content": "Say something."}]
    chat = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0)
    assert chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=10, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == chat.choices[0].message.content


def test_greedy_pd_equals_transformers(serve: Serve, client: openai.OpenAI, llama_ckpt: Path) -> None:
    rng = random.Random(4)
    for length in (5, 23, 40):  # 23 and 40 span several 16-token blocks: real multi-block KV transfer
        prompt = [rng.randrange(3, 500) for _ in range(length)]
        out = client.completions.create(model=serve_model(serve), prompt=prompt, max_tokens=10, temperature=0,
                                        extra_body={"ignore_eos": True, "return_token_ids": True})
        ours = out.choices[0].model_extra["token_ids"]
        reference = hf_greedy(llama_ckpt, prompt, 10)
        assert ours[:len(reference)] == reference


def test_bad_request_through_the_proxy_is_a_400(serve: Serve, client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=serve_model(serve), prompt=PROMPT, max_tokens=1, temperature=-1)
    assert err.value.body["param"] == "temperature"


def test_64_concurrent_streams_complete(serve: Serve) -> None:
    model = serve_model(serve)

    async def one(client: openai.AsyncOpenAI, i: int) -> tuple[str, str | None]:
        stream = await client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0,
                                                 stream=True)
        text, reason = "", None
        async for chunk in stream:
            text += chunk.choices[0].text
            reason = chunk.choices[0].finish_reason or reason
        return text, reason

    async def main() -> list[tuple[str, str | None]]:
        async with openai.AsyncOpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=300,
                                      max_retries=0) as client:
            return await asyncio.gather(*(one(client, i) for i in range(64)))

    results = asyncio.run(main())
    assert len(results) == 64 and all(reason in ("length", "stop") for _, reason in results)
    info = [httpx.get(f"{u}/info", timeout=5).json() for u in serve.instance_urls().values()]
    assert all(i["num_pending_requests"] == 0 for i in info)


def test_sigkill_decode_mid_stream(serve: Serve, client: openai.OpenAI) -> None:
    """Runs last: kills the module's deployment."""
    quick = client.with_options(timeout=10)  # an answer must come within 10 s, error or not
    decode_pid = serve.instance_pid("decode-0")  # asked first: the kill follows the first chunk at once
    # Nearly the model's 512 positions: on a loaded machine the client may read its first chunk seconds after the
    # decode sent it, and a shorter answer was then already whole when the kill came.
    stream = quick.completions.create(model=serve_model(serve), prompt=PROMPT, max_tokens=500, temperature=0,
                                      stream=True, extra_body={"ignore_eos": True})
    with pytest.raises((openai.APIError, httpx.HTTPError)) as err:
        for n, _ in enumerate(stream):
            if n == 0:
                os.kill(decode_pid, signal.SIGKILL)
    assert not isinstance(err.value, openai.APITimeoutError), "the proxy left the client hanging"
    try:
        code = serve.proc.wait(30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the launcher did not exit within 30s after decode-0 died:\n{serve.output}")
    assert code == 1
    assert "decode-0" in serve.output and "killed by signal 9" in serve.output
    wait_gone(serve.children)
    assert not alive([decode_pid])
