"""An instance that answers 503 shutting_down (it is stopping: SIGTERM, its pod deleted; http/shutdown_answer.py) is
taken for gone, as one that dropped the connection: a decode's request that is not streamed, a stream it refuses
before its headers, or a stream's continuation goes on on another decode (a `died` migration, without the prefill's KV
params; the held KV goes back), a prefill's leg goes to another prefill (retry.py), and the instance is marked down.
With no other decode the client gets the instance's 503 shutting_down with its Retry-After (with no other prefill the
decode computes the prompt under kv_transfer.load_failure_policy recompute: prefill_leg.py); with
proxy.migration_limit 0 a decode leg is retried once on another decode, as a gone one. Through the proxy's HTTP app in
front of fake instances.

Nothing here leans on timing, so that a loaded machine does not fail it: the proxy's /health probe may take
PATIENCE_S (past the default 2 s an instance merely slow to answer is marked stalled and skipped: the request would
never reach it), and "marked down" is read from the proxy's log, not its instance state, which the next probe (a second
later) sets back to ready: the fake's /health still answers, as an instance's does while its drain runs."""

from __future__ import annotations

import json
import logging
from typing import Any, Literal

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from pdlaunch.http.shutdown_answer import shutting_down, stream_cut_body
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.upstream import STOPPING
from tests.helpers.fake_instances import FakeInstance
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill

# Every wait's bound: the proxy's health probe, its requests' deadline, the client's, a poll's. Generous: these tests
# must pass on a loaded 2-core machine, where a probe or a request through three threaded servers may take seconds.
PATIENCE_S = 60.0


class _Stopping(FakeInstance):
    """An instance that is shutting down: its /health still answers (its drain runs), every request gets 503
    shutting_down."""

    async def completions(self, request: Request) -> Response:
        await self.body(request)
        error = shutting_down()
        return Response(json.dumps(error.body()), status_code=503, media_type="application/json",
                        headers={"Retry-After": str(error.retry_after_s)})


class _Decode(FakeInstance):
    """Answers every request "done", whole or as a stream of one chunk and [DONE]."""

    async def completions(self, request: Request) -> Any:
        body = await self.body(request)
        choice = {"index": 0, "text": "done", "finish_reason": "length"}
        answer = {"id": "cmpl-a", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        if not body.get("stream"):
            return answer
        if body.get("return_token_ids"):
            choice.update(token_ids=[7], prompt_token_ids=[1, 2])
        chunks = [f"data: {json.dumps(answer)}\n\n".encode(), b"data: [DONE]\n\n"]
        return StreamingResponse(iter(chunks), media_type="text/event-stream")


class _Deployment:
    """The proxy in front of `prefills` and `decodes` (name, app), each picked in the order given."""

    def __init__(self, prefills: list[FastAPI], decodes: list[FastAPI], migration_limit: int = 3,
                 decode_role: Literal["decode", "colocated"] = "decode") -> None:
        self.ports = PortAllocator("127.0.0.1")
        self.servers = [ThreadServer(app, self.ports.free(f"p{i}")) for i, app in enumerate(prefills)] + \
            [ThreadServer(app, self.ports.free(f"d{i}")) for i, app in enumerate(decodes)]
        self.prefills, self.decodes, self.limit = len(prefills), len(decodes), migration_limit
        self.decode_role = decode_role

    def __enter__(self) -> _Deployment:
        urls = [s.__enter__().url for s in self.servers]
        self.pool = InstancePool(
            [Instance("prefill", u, f"prefill-{i}") for i, u in enumerate(urls[:self.prefills])]
            + [Instance(self.decode_role, u, f"{self.decode_role}-{i}") for i, u in enumerate(urls[self.prefills:])],
            health_timeout_s=PATIENCE_S)
        app = build_proxy_app(self.pool, PATIENCE_S, deployment_secret=SECRET, migration_limit=self.limit)
        self.proxy = ThreadServer(app, self.ports.free("proxy"))
        self.url = self.proxy.__enter__().url
        wait_for(lambda: all(i.state == "ready" for i in self.pool.instances), "the proxy to see every instance",
                 PATIENCE_S)
        self.pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # the first ready one
        return self

    def __exit__(self, *exc: object) -> None:
        self.proxy.__exit__(*exc)
        for server in reversed(self.servers):
            server.__exit__(*exc)

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=PATIENCE_S).text

    def marked_down(self, name: str, caplog: pytest.LogCaptureFixture) -> bool:
        """Whether the proxy logged instance `name` marked down for answering shutting_down (caplog set to WARNING
        for pdlaunch.proxy). Its state says so only until the next /health probe (module docstring)."""
        url = next(i.url for i in self.pool.instances if i.name == name)
        return f"{name} ({url}) marked down: {STOPPING}" in caplog.text


def _post(url: str, **fields: Any) -> httpx.Response:
    """A completion of prompt "go" (4 tokens) through the proxy at `url`."""
    return httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 4, **fields}, timeout=PATIENCE_S)


def test_a_whole_request_whose_decode_answers_shutting_down_is_answered_by_the_other_decode(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdlaunch.proxy")
    prefill, stopping, decode = Prefill(), _Stopping(), _Decode()
    with _Deployment([prefill.app], [stopping.app, decode.app]) as pd:
        answer = _post(pd.url)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["text"] == "done"
        assert "kv_transfer_params" in stopping.bodies[0]  # the first decode got the prefill's KV to load
        assert "kv_transfer_params" not in decode.bodies[0]  # the other computes the prompt itself
        wait_for(lambda: prefill.released == prefill.legs, "the prefill's held KV to be released", PATIENCE_S)
        assert 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in pd.metrics()
        assert pd.marked_down("decode-0", caplog), caplog.text


def test_a_stream_whose_decode_answers_shutting_down_before_its_headers_goes_on_on_the_other_decode() -> None:
    prefill, stopping, decode = Prefill(), _Stopping(), _Decode()
    with _Deployment([prefill.app], [stopping.app, decode.app]) as pd:
        text = _post(pd.url, stream=True).text
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text
        assert '"done"' in text
        assert len(stopping.bodies) == 1 and "kv_transfer_params" not in decode.bodies[0]
        assert 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in pd.metrics()


def test_a_prefill_that_answers_shutting_down_leaves_the_leg_to_another_prefill(
        caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdlaunch.proxy")
    stopping, prefill, decode = _Stopping(), Prefill(), _Decode()
    with _Deployment([stopping.app, prefill.app], [decode.app]) as pd:
        answer = _post(pd.url)
        assert answer.status_code == 200, answer.text
        assert len(stopping.bodies) == 1 and len(prefill.legs) == 1
        assert decode.bodies[0]["kv_transfer_params"]["remote_request_id"] == prefill.legs[0]
        assert 'pdlaunch_proxy_legs_retried_total{reason="instance_gone",role="prefill"} 1.0' in pd.metrics()
        assert pd.marked_down("prefill-0", caplog), caplog.text


def test_with_no_other_instance_the_client_gets_the_503_shutting_down_and_without_migration_one_retry() -> None:
    for prefills, decodes, limit in (([Prefill().app], [_Stopping().app], 3),
                                     ([Prefill().app], [_Stopping().app, _Decode().app], 0)):
        with _Deployment(prefills, decodes, migration_limit=limit) as pd:
            answer = _post(pd.url)
            if len(decodes) == 1:
                assert answer.status_code == 503, answer.text
                assert answer.json()["error"]["code"] == "shutting_down"
                assert answer.headers["retry-after"] == "1"
            else:  # migration off: the leg is still retried once on another decode (retry.py), as a gone one
                assert answer.status_code == 200, answer.text


def test_with_no_other_prefill_the_decode_computes_the_prompt_of_a_prefill_that_answers_shutting_down() -> None:
    """Under kv_transfer.load_failure_policy recompute (the default), as for a stalled prefill (prefill_leg.py); the
    other cases, and policy fail's 503: test_prefill_gone_recompute.py."""
    stopping, decode = _Stopping(), _Decode()
    with _Deployment([stopping.app], [decode.app]) as pd:
        answer = _post(pd.url)
        assert answer.status_code == 200, answer.text
        assert len(stopping.bodies) == 1 and "kv_transfer_params" not in decode.bodies[0]
        assert 'pdlaunch_proxy_legs_retried_total{reason="recompute",role="prefill"} 1.0' in pd.metrics()


class _Continuing(FakeInstance):
    """A decode that streams one chunk and ends without [DONE] (`finish` None: a dead decode's stream), or, for a
    continuation (a prompt of ids), one chunk "B" with finish_reason `finish` and [DONE]."""

    def __init__(self, finish: str | None) -> None:
        super().__init__()
        self.finish = finish

    async def completions(self, request: Request) -> Any:
        body = await self.body(request)
        continued = isinstance(body["prompt"], list)
        choice: dict[str, Any] = {"index": 0, "text": "B" if continued else "A", "token_ids": [7],
                                  "finish_reason": self.finish if continued else None}
        if not continued:
            choice["prompt_token_ids"] = [1, 2]
        chunk = {"id": "cmpl-z", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        events = [f"data: {json.dumps(chunk)}\n\n".encode()]
        if choice["finish_reason"]:
            events.append(b"data: [DONE]\n\n")
        return StreamingResponse(iter(events), media_type="text/event-stream")


def test_a_continuation_whose_decode_answers_shutting_down_goes_on_on_another_decode() -> None:
    ending, stopping, finishing = _Continuing(None), _Stopping(), _Continuing("length")
    with _Deployment([Prefill().app], [ending.app, stopping.app, finishing.app]) as pd:
        picks = ["decode-0", "decode-1", "decode-2"]  # the stream, its continuation, the continuation again

        def choose(role: str, ready: list[Instance]) -> Instance:
            named = [i for i in ready if picks and i.name == picks[0]] if role == "decode" else []
            if named:
                picks.pop(0)
            return (named or ready)[0]

        pd.pool.policy.choose = choose  # type: ignore[method-assign]
        text = _post(pd.url, stream=True).text
        assert text.endswith("data: [DONE]\n\n") and '"error"' not in text, text
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        assert "".join(e["choices"][0]["text"] for e in events) == "AB"
        assert stopping.bodies[0]["prompt"] == finishing.bodies[0]["prompt"] == [1, 2, 7]
        assert 'pdlaunch_proxy_migrations_total{reason="died"} 2.0' in pd.metrics()


class _Cut(FakeInstance):
    """A decode whose drain at shutdown cuts every stream it runs: one chunk ("A", or "B" for a continuation: a prompt
    of ids), then the shutting_down event and [DONE], as an instance's ShutdownAnswer ends it."""

    async def completions(self, request: Request) -> Any:
        body = await self.body(request)
        continued = isinstance(body["prompt"], list)
        choice: dict[str, Any] = {"index": 0, "text": "B" if continued else "A", "token_ids": [7],
                                  "finish_reason": None}
        if not continued:
            choice["prompt_token_ids"] = [1, 2]
        chunk = {"id": "cmpl-c", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        events = [f"data: {json.dumps(chunk)}\n\n".encode(), f"data: {json.dumps(stream_cut_body())}\n\n".encode(),
                  b"data: [DONE]\n\n"]
        return StreamingResponse(iter(events), media_type="text/event-stream")


def _stream(url: str, **fields: Any) -> list[str]:
    """The `data:` payloads of a streamed completion through the proxy at `url`."""
    text = _post(url, stream=True, **fields).text
    return [line[6:] for line in text.splitlines() if line.startswith("data: ")]


def _ends_shutting_down(events: list[str]) -> None:
    """The stream ends with the decode's shutting_down event then [DONE]: the client's 503, which says to retry, not a
    502 instance_failed ("closed the stream before it finished")."""
    assert events[-1] == "[DONE]", events
    errors = [json.loads(e)["error"] for e in events if e.startswith('{"error"')]
    assert [e["code"] for e in errors] == ["shutting_down"] and "shutting down" in errors[0]["message"], events


def test_a_stream_its_decode_ends_with_the_shutting_down_event_goes_on_on_the_other_decode(
        caplog: pytest.LogCaptureFixture) -> None:
    """The decode's drain cut the stream: the proxy takes its shutting_down event for the decode gone (a `died`
    migration, the decode marked down) and the client gets the whole text, no error event."""
    caplog.set_level(logging.WARNING, logger="pdlaunch.proxy")
    cut, finishing = _Cut(), _Continuing("length")
    with _Deployment([Prefill().app], [cut.app, finishing.app]) as pd:
        events = _stream(pd.url)
        assert events[-1] == "[DONE]" and not [e for e in events if e.startswith('{"error"')], events
        assert "".join(json.loads(e)["choices"][0]["text"] for e in events[:-1]) == "AB", events
        assert finishing.bodies[0]["prompt"] == [1, 2, 7]
        assert 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in pd.metrics()
        assert pd.marked_down("decode-0", caplog), caplog.text


def test_a_stream_its_decode_cuts_ends_with_the_shutting_down_event_where_it_cannot_go_on(
        caplog: pytest.LogCaptureFixture) -> None:
    """No other decode ready (1P1D whose decode is stopped, one colocated instance whose pod is deleted), the request
    not migratable (a `stop` string), migration off, or the limit reached: the client gets the decode's shutting_down
    event as the stream's end (it was `502 instance_failed ... closed the stream before it finished` where migration
    was on), and the decode is marked down, as one that answers 503 shutting_down."""
    caplog.set_level(logging.WARNING, logger="pdlaunch.proxy")
    cases: list[tuple[str, list[FastAPI], list[FastAPI], int, dict[str, Any], str]] = [
        ("no other decode", [Prefill().app], [_Cut().app], 3, {}, "decode"),
        ("one colocated instance", [], [_Cut().app], 3, {}, "colocated"),
        ("not migratable", [Prefill().app], [_Cut().app, _Decode().app], 3, {"stop": ["zz"]}, "decode"),
        ("migration off", [Prefill().app], [_Cut().app, _Decode().app], 0, {}, "decode"),
        ("limit reached", [Prefill().app], [_Cut().app, _Cut().app, _Decode().app], 1, {}, "decode"),
    ]
    for name, prefills, decodes, limit, fields, role in cases:
        with _Deployment(prefills, decodes, migration_limit=limit, decode_role=role) as pd:  # type: ignore[arg-type]
            events = _stream(pd.url, **fields)
            try:
                _ends_shutting_down(events)
            except AssertionError as exc:
                raise AssertionError(f"{name}: {exc}") from None
            assert events[0].startswith("{") and json.loads(events[0])["choices"][0]["text"] == "A", (name, events)
            assert pd.marked_down(f"{role}-0", caplog), (name, caplog.text)
            caplog.clear()


def test_a_stream_whose_decode_and_the_next_one_both_stop_ends_with_shutting_down() -> None:
    """The decode's drain cut the stream, and the only other decode answers the continuation 503 shutting_down: nowhere
    left to go, the client gets the shutting_down event (not a 502 naming the second decode's answer)."""
    with _Deployment([Prefill().app], [_Cut().app, _Stopping().app]) as pd:
        events = _stream(pd.url)
        _ends_shutting_down(events)
        assert 'pdlaunch_proxy_migrations_total{reason="died"} 1.0' in pd.metrics()


def test_past_the_migration_limit_a_request_whose_last_decode_stopped_gets_the_503_shutting_down() -> None:
    """Every decode the request went to answered 503 shutting_down until proxy.migration_limit: the client gets that
    503 with its Retry-After (it says to retry), not the 502 migration_limit; whole, or a stream before its headers."""
    for stream in (False, True):
        with _Deployment([Prefill().app], [_Stopping().app, _Stopping().app, _Decode().app], migration_limit=1) as pd:
            answer = _post(pd.url, stream=stream)
            assert answer.status_code == 503, (stream, answer.text)
            assert answer.json()["error"]["code"] == "shutting_down" and answer.headers["retry-after"] == "1", \
                (stream, answer.text)
