"""An instance keeps answering while a request's structured-output grammar compiles: the check ran on the event
loop, so a long guided_choice list (50,000 choices compile in about 1.5 s, and a 16 MB body holds far more)
stalled every stream and /health of the instance meanwhile. A real instance (tiny model, CPU, in this process)."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import httpx
import pytest

from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.server import request_fields
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "audit-api-event-loop-0") as (address, _):
        yield address


def _choice_request_in_a_thread(url: str) -> tuple[threading.Thread, list[httpx.Response]]:
    """A guided_choice completion posted from a started thread; its answer lands in the list."""
    answer: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: answer.append(httpx.post(
        f"{url}/v1/completions", timeout=TIMEOUT,
        json={"model": "tiny", "prompt": "pick", "max_tokens": 3, "guided_choice": ["yes", "no"]})), daemon=True)
    thread.start()
    return thread, answer


def _assert_chose(answer: list[httpx.Response]) -> None:
    assert answer and answer[0].status_code == 200, answer
    assert answer[0].json()["choices"][0]["text"] in ("yes", "no")


def test_health_answers_while_a_grammar_compiles(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The grammar check is held until /health has answered: on the event loop it could not answer at all."""
    compiling, health_answered = threading.Event(), threading.Event()
    check = request_fields.structured_output_of

    def held_check(response_format: JsonValue, structured_outputs: JsonValue, guided: JsonObject
                   ) -> request_fields.StructuredOutput | None:
        compiling.set()
        assert health_answered.wait(TIMEOUT), "/health did not answer while the grammar compiled"
        return check(response_format, structured_outputs, guided)

    monkeypatch.setattr(request_fields, "structured_output_of", held_check)
    request, answer = _choice_request_in_a_thread(url)
    try:
        assert compiling.wait(TIMEOUT), "the request never reached its grammar check"
        assert httpx.get(f"{url}/health", timeout=TIMEOUT).status_code == 200
    finally:
        health_answered.set()
        request.join(TIMEOUT)
    _assert_chose(answer)


def test_other_requests_finish_while_a_grammar_matcher_builds(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The matcher over the engine's tokenizer (the grammar's second, larger compile) is built off the engine
    thread: with it held, a plain request still runs to its end. Built on the engine thread, it held every step."""
    from pdlaunch.engine import structured_output

    building, plain_done = threading.Event(), threading.Event()
    build = structured_output.GrammarBackend.matcher

    def held_build(self: structured_output.GrammarBackend, spec: structured_output.StructuredOutput) -> object:
        building.set()
        assert plain_done.wait(TIMEOUT), "the plain request did not finish while the matcher was built"
        return build(self, spec)

    monkeypatch.setattr(structured_output.GrammarBackend, "matcher", held_build)
    structured, answer = _choice_request_in_a_thread(url)
    try:
        assert building.wait(TIMEOUT), "the structured request never reached its matcher"
        plain = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT,
                           json={"model": "tiny", "prompt": "go on", "max_tokens": 8, "ignore_eos": True})
        assert plain.status_code == 200 and plain.json()["usage"]["completion_tokens"] == 8, plain.text
    finally:
        plain_done.set()
        structured.join(TIMEOUT)
    _assert_chose(answer)


def test_a_grammar_the_tokenizer_refuses_is_a_400_naming_it(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """An error building the matcher (now on a grammar thread) still reaches the client as a 400 naming the field,
    and the instance serves on."""
    from pdlaunch.engine import structured_output
    from pdlaunch.errors import EngineError

    def refused(self: structured_output.GrammarBackend, spec: structured_output.StructuredOutput) -> object:
        raise EngineError(f"{spec.field}: the token table refuses it", field=spec.field)

    monkeypatch.setattr(structured_output.GrammarBackend, "matcher", refused)
    bad = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT,
                     json={"model": "tiny", "prompt": "pick", "max_tokens": 3, "guided_choice": ["yes", "no"]})
    assert bad.status_code == 400, bad.text
    assert "the token table refuses it" in bad.json()["error"]["message"], bad.text
    assert bad.json()["error"]["param"] == "guided_choice", bad.text
    monkeypatch.undo()
    ok = httpx.post(f"{url}/v1/completions", timeout=TIMEOUT, json={"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert ok.status_code == 200, ok.text
