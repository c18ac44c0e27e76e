"""An instance past its pending-request limit answers its 503 `overloaded` with Retry-After (whole seconds), which
the openai client and most HTTP clients wait for before their retry; its other answers carry none. A real instance
(tiny model, CPU, in this process)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.http.retry_later import OVERLOADED_RETRY_AFTER_S
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def instance() -> Iterator[tuple[str, EngineLoop]]:
    with in_process_instance(tiny_colocated(256), "overloaded-retry-after-0") as served:
        yield served


@pytest.mark.parametrize("stream", [False, True])
def test_the_overloaded_503_says_when_to_retry(instance: tuple[str, EngineLoop], stream: bool) -> None:
    url, loop = instance
    body = {"model": "tiny", "prompt": "hello", "max_tokens": 2, "stream": stream}
    served = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    assert served.status_code == 200 and "retry-after" not in served.headers, served.text
    limit = loop.max_pending_requests
    loop.max_pending_requests = 0  # every request is one too many: no requests need holding to reach the limit
    try:
        refused = httpx.post(f"{url}/v1/completions", json=body, timeout=TIMEOUT)
    finally:
        loop.max_pending_requests = limit
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded", refused.text
    assert refused.headers.get("retry-after") == str(OVERLOADED_RETRY_AFTER_S)
