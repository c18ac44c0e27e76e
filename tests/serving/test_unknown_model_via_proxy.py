"""A request naming a model the deployment does not serve, through the proxy in front of a tiny prefill and decode
(real engines, in this process): the 404 names the deployment's model, not "this instance serves": the client talks
to the deployment and never chose an instance. The instance's answer passes through the proxy as it is, so the
instance words it for the deployment it is part of (every instance of a deployment serves the same names)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.serving.tiny_instances import TIMEOUT, tiny_pd


@pytest.fixture(scope="module")
def proxy() -> Iterator[str]:
    with tiny_pd("unknown-model") as pd:
        yield pd.proxy


@pytest.mark.parametrize(("path", "body"), [
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}),
    ("/tokenize", {"prompt": "hi"}),
], ids=["completions", "chat", "tokenize"])
def test_an_unknown_model_through_the_proxy_names_the_deployments(proxy: str, path: str, body: dict[str, Any]) -> None:
    answer = httpx.post(f"{proxy}{path}", json={"model": "gpt-4o", **body}, timeout=TIMEOUT)
    assert answer.status_code == 404, answer.text
    error = answer.json()["error"]
    assert error["code"] == "model_not_found" and error["param"] == "model", error
    assert error["message"] == "model 'gpt-4o' is not served here: this deployment serves 'tiny' (GET /v1/models " \
                               "lists it)", error
