"""Prompt logprobs (engine/prompt_logprobs.py) through HTTP on a random Llama checkpoint, CPU: vLLM's
`prompt_logprobs` (completions and chat) and completions' echo with logprobs equal transformers'
log-softmax at every prompt position, also when the prompt is prefilled in chunks over several steps and
when its blocks are already in the prefix cache; what cannot be honoured is a 400 naming the field."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import torch

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.checkpoints import hf_logits, make_llama
from tests.serving.helpers import ThreadServer, in_process_instance, wait_for

SECRET = "test-deployment-secret-0123456789"
PROMPT = [(7 * i + 3) % 500 + 5 for i in range(41)]  # 41 tokens: 3 chunks of 16 at most


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_llama(tmp_path_factory.mktemp("prompt-logprobs-llama"), seed=11)


@pytest.fixture(scope="module")
def expected(checkpoint: Path) -> torch.Tensor:
    """transformers' log-softmax at every prompt position: row p gives the logprob of token p + 1."""
    return hf_logits(checkpoint, PROMPT).log_softmax(dim=-1)


@pytest.fixture(scope="module")
def url(checkpoint: Path) -> Iterator[str]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": str(checkpoint)}, "cache": {"num_gpu_blocks": 128, "block_size": 8},
        "scheduler": {"max_num_seqs": 8, "max_num_batched_tokens": 16},
        "security": {"deployment_secret": SECRET},
    })
    with in_process_instance(cfg, "prompt-logprobs-0", max_pending_requests=16) as (url, _):
        yield url


def post(url: str, path: str = "/v1/completions", **body: Any) -> httpx.Response:
    if path == "/v1/completions":
        body.setdefault("prompt", PROMPT)
    return httpx.post(f"{url}{path}", json={"max_tokens": 3, "temperature": 0.0, **body}, timeout=120)


def check_against(prompt_logprobs: list[Any], expected: torch.Tensor, k: int) -> None:
    assert len(prompt_logprobs) == len(PROMPT) and prompt_logprobs[0] is None
    for p in range(1, len(PROMPT)):
        row, token = expected[p - 1], PROMPT[p]
        entry = prompt_logprobs[p]
        assert entry[str(token)]["logprob"] == pytest.approx(row[token].item(), abs=1e-4)
        assert entry[str(token)]["rank"] == int((row > row[token]).sum()) + 1
        top = [int(t) for t in row.topk(k).indices] if k else []
        others = {int(t) for t in entry} - {token}
        assert others <= set(top) and set(top) <= {int(t) for t in entry}


@pytest.mark.parametrize("k", [0, 3])
def test_completion_prompt_logprobs_equal_transformers(url: str, expected: torch.Tensor, k: int) -> None:
    answer = post(url, prompt_logprobs=k)
    assert answer.status_code == 200, answer.text
    check_against(answer.json()["choices"][0]["prompt_logprobs"], expected, k)


def test_prompt_logprobs_after_a_prefix_cache_hit(url: str, expected: torch.Tensor) -> None:
    assert post(url).status_code == 200  # the prompt's blocks are cached now
    answer = post(url, prompt_logprobs=1)
    assert answer.status_code == 200, answer.text
    check_against(answer.json()["choices"][0]["prompt_logprobs"], expected, 1)
    assert "prompt_logprobs" not in post(url).json()["choices"][0]  # only when asked


def test_echo_with_logprobs_leads_with_the_prompt(url: str, expected: torch.Tensor) -> None:
    answer = post(url, echo=True, logprobs=2)
    assert answer.status_code == 200, answer.text
    logprobs = answer.json()["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(PROMPT) + 3
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    got = logprobs["token_logprobs"][1:len(PROMPT)]
    want = [expected[p - 1, PROMPT[p]].item() for p in range(1, len(PROMPT))]
    assert got == pytest.approx(want, abs=1e-4)
    # Alternatives are keyed by their text (OpenAI's shape), so two tokens of one text share an entry; the prompt's
    # own token is among them (OpenAI's "up to logprobs+1 elements").
    for p, top in enumerate(logprobs["top_logprobs"][1:len(PROMPT)], start=1):
        own = expected[p - 1, PROMPT[p]].item()
        best = [*expected[p - 1].topk(2).values.tolist(), own]
        assert 1 <= len(top) <= 3 and all(min(abs(v - b) for b in best) < 1e-4 for v in top.values())
        assert top[logprobs["tokens"][p]] == pytest.approx(own, abs=1e-4)
    plain = post(url, logprobs=2).json()["choices"][0]["logprobs"]
    assert logprobs["token_logprobs"][len(PROMPT):] == pytest.approx(plain["token_logprobs"], abs=1e-5)


def test_chat_prompt_logprobs(url: str) -> None:
    answer = post(url, "/v1/chat/completions", messages=[{"role": "user", "content": "hello there"}],
                  prompt_logprobs=2)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["prompt_logprobs"][0] is None
    assert len(body["prompt_logprobs"]) == body["usage"]["prompt_tokens"]
    assert all(1 <= len(e) <= 3 for e in body["prompt_logprobs"][1:])


@pytest.mark.parametrize(("body", "param"), [
    ({"prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"prompt_logprobs": 21}, "prompt_logprobs"),
    ({"prompt_logprobs": -1}, "prompt_logprobs"),
    ({"prompt_logprobs": 1, "kv_transfer_params": {"do_remote_prefill": True}}, "prompt_logprobs"),
])
def test_what_cannot_be_honoured_is_a_400(url: str, body: dict[str, Any], param: str) -> None:
    answer = post(url, **body)
    assert answer.status_code == 400 and answer.json()["error"]["param"] == param, answer.text


@pytest.mark.parametrize(("path", "body", "param"), [
    ("/v1/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
    ("/v1/completions", {"logprobs": -1}, "logprobs"),
    ("/v1/completions", {"echo": True, "logprobs": -1}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs"),
    ("/v1/chat/completions", {"prompt_logprobs": -1}, "prompt_logprobs"),
])
def test_minus_one_the_whole_vocabulary_is_a_400_that_says_what_to_send(url: str, path: str, body: dict[str, Any],
                                                                       param: str) -> None:
    """vLLM reads -1 as every token of the vocabulary; pydantic's 'greater than or equal to 0' did not say that
    -1 means something elsewhere, nor what to send here."""
    if path.endswith("chat/completions"):
        body = {**body, "messages": [{"role": "user", "content": "hi"}]}
    answer = post(url, path, **body)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == param and "-1" in error["message"] and "0 to 20" in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_0_with_stream_is_a_400_not_dropped(url: str, path: str) -> None:
    """vLLM refuses a stream's prompt_logprobs above 0 and takes 0, but its chunks carry none: the field was
    dropped without a word. A stream cannot carry them here either, so 0 is refused as every other value."""
    body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {}
    answer = post(url, path, **body, prompt_logprobs=0, stream=True)
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["param"] == "prompt_logprobs" and "stream" in error["message"], error


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_prompt_logprobs_0_with_stream_is_a_400_through_the_proxy(url: str, path: str) -> None:
    pool = InstancePool([Instance(role="colocated", url=url, name="colocated-0")])
    app = build_proxy_app(pool, 60.0, deployment_secret=SECRET)
    with ThreadServer(app, PortAllocator("127.0.0.1").free("test proxy")) as proxy:
        wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see the instance")
        body: dict[str, Any] = {"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {}
        answer = post(proxy.url, path, **body, prompt_logprobs=0, stream=True)
    assert answer.status_code == 400, answer.text
    assert answer.json()["error"]["param"] == "prompt_logprobs", answer.text
