"""A key of `stream_options` that neither vLLM nor pdlaunch knows is ignored, as vLLM ignores it, and named in the
log (real HTTP to one instance of the tiny model on CPU). It passed without a word: a client's typo of
`include_usage` (`include_usge: true`) did not get the usage chunk it meant to ask for, and nothing said why."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from tests.serving.helpers import in_process_instance

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 512}, "cache": {"num_gpu_blocks": 64},
    })
    with in_process_instance(cfg, "ignored-nested-0") as (instance_url, _):
        yield instance_url


@pytest.mark.parametrize("path", ["/v1/completions", "/v1/chat/completions"])
def test_an_unknown_stream_options_key_is_named_in_the_log(url: str, path: str,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    key = f"include_usge{path.replace('/', '_')}"  # one name per test: each is warned about once per process
    body = {"prompt": "hi"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "hi"}]}
    with caplog.at_level(logging.WARNING, logger="pdlaunch.server.unsupported_fields"):
        with httpx.stream("POST", f"{url}{path}", json={**body, "max_tokens": 2, "stream": True,
                                                         "stream_options": {key: True}}, timeout=TIMEOUT) as answer:
            assert answer.status_code == 200
            chunks = [line for line in answer.iter_lines() if line.startswith("data: {")]
    last = json.loads(chunks[-1].removeprefix("data: "))
    assert last["choices"] and "usage" not in last  # ignored: include_usage stays false (vLLM's default)
    warned = [r.getMessage() for r in caplog.records if "present in the request but ignored" in r.getMessage()]
    assert warned == [f"The following fields were present in the request but ignored: 'stream_options.{key}'"]


def test_the_known_keys_are_not_named(url: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="pdlaunch.server.unsupported_fields"):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2, "stream": True,
                                                            "stream_options": {"include_usage": False}},
                            timeout=TIMEOUT)
    assert answer.status_code == 200
    assert not [r for r in caplog.records if "present in the request but ignored" in r.getMessage()]
