"""An instance keeps answering while a request's structured-output grammar compiles: the check ran on the event
loop, so a long guided_choice list (50,000 choices compile in about 1.5 s, and a 16 MB body holds far more)
stalled every stream and /health of the instance meanwhile. A real instance (tiny model, CPU, in this process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.server import protocol
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "audit-api-event-loop-0") as (address, _):
        yield address


def test_health_answers_while_a_grammar_compiles(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grammar check is held until /health has answered: on the event loop it could not answer at all."""
    compiling, health_answered = threading.Event(), threading.Event()
    check = protocol.structured_output_of

    def held_check(response_format: JsonValue, structured_outputs: JsonValue, guided: JsonObject
                   ) -> protocol.StructuredOutput | None:
        compiling.set()
        assert health_answered.wait(TIMEOUT), "/health did not answer while the grammar compiled"
        return check(response_format, structured_outputs, guided)

    monkeypatch.setattr(protocol, "structured_output_of", held_check)
    answer: list[httpx.Response] = []
    request = threading.Thread(target=lambda: answer.append(httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={
        "model": "tiny", "prompt": "pick", "max_tokens": 3, "guided_choice": ["yes", "no"]})), daemon=True)
    request.start()
    try:
        assert compiling.wait(TIMEOUT), "the request never reached its grammar check"
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    finally:
        health_answered.set()
        request.join(TIMEOUT)
    assert answer and answer[0].status_code == 200, answer
    assert answer[0].json()["choices"][0]["text"] in ("yes", "no")
