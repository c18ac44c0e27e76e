"""The proxy asks a prefill to release the KV it holds for a request (POST /internal/kv/release, proxy/release.py)
only once no decode leg of that request will read it. The prefill's release ends the whole hold
(kv_transfer/prefill/holds.py `HoldTable.release`), so a release for decode A's leg while decode B got (or will get)
the same params would fail B's load and make it compute the prompt. Two paths send one prefill's params to two
decodes or move a leg: a leg whose decode is gone (refused the connection) is sent again, with the same params, to
another decode (retry.py), and the release comes only after that leg ended, when it failed; a leg migrated off a
stalled decode (migrate.py) is released before the new decode's leg, which carries no params (it computes the
prompt itself).

Each fake decode logs when a leg starts and ends, with the remote_request_id its params carry, and the proxy's
releaser logs when the proxy decides to release: the order is checked on that one log."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import httpx
import pytest
from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.bodies import Body
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.stalling_instance import StallingInstance
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill

NO_PARAMS = "-"
Log = list[tuple[str, str, str]]  # (start | end | release, instance or "proxy", remote_request_id or NO_PARAMS)


class Decode(StallingInstance):
    """Answers a decode leg as its prompt says: ok (a whole answer or a stream) or fail (500); one that `stalls`
    answers none, and its /health stops answering. Logs each leg's start and end with the held request its params
    name."""

    def __init__(self, name: str, log: Log, stalls: bool = False) -> None:
        super().__init__()
        self.name, self.log, self.stalls = name, log, stalls

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        params = body.get("kv_transfer_params") or {}
        rid = params.get("remote_request_id", NO_PARAMS)
        self.log.append(("start", self.name, rid))
        if self.stalls:
            await self.stall()
        if body["prompt"] == "fail":
            self.log.append(("end", self.name, rid))
            return JSONResponse({"error": {"message": "boom"}}, status_code=500)
        choice = {"index": 0, "text": "done", "finish_reason": "length", "token_ids": [7]}
        if not body.get("stream"):
            self.log.append(("end", self.name, rid))
            return {"id": "cmpl-d", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}
        chunk = {"id": "cmpl-d", "object": "text_completion", "created": 1, "model": "m",
                 "choices": [{**choice, "prompt_token_ids": [1, 2]}]}

        async def events() -> AsyncIterator[bytes]:
            try:
                yield f"data: {json.dumps(chunk)}\n\n".encode()
                yield b"data: [DONE]\n\n"
            finally:
                self.log.append(("end", self.name, rid))

        return StreamingResponse(events(), media_type="text/event-stream")


@contextmanager
def _deployment(log: Log, decodes: dict[str, bool], dead_first: bool, health_timeout_s: float = 5.0,
                migration_limit: int = 3) -> Iterator[tuple[str, Prefill, InstancePool]]:
    """A prefill, a decode that nothing listens on (first, when `dead_first`), the fake decodes (name: whether it
    stalls), and the proxy in front, whose releaser logs each release it decides."""
    ports = PortAllocator("127.0.0.1")
    prefill = Prefill()
    with ExitStack() as stack:
        instances = [Instance("prefill", stack.enter_context(ThreadServer(prefill.app, ports.free("prefill"))).url,
                              "prefill-0")]
        if dead_first:
            instances.append(Instance("decode", f"http://127.0.0.1:{ports.free('nothing listens')}", "decode-dead"))
        for name, stalls in decodes.items():
            instances.append(Instance("decode", stack.enter_context(
                ThreadServer(Decode(name, log, stalls).app, ports.free(name))).url, name))
        pool = InstancePool(instances, health_timeout_s=health_timeout_s)
        if dead_first:  # no probe marks the dead decode down before a leg is sent to it
            async def every_instance_ready(_client: httpx.AsyncClient, instance: Instance) -> None:
                if instance.state == "starting":
                    instance.state = "ready"

            pool._check = every_instance_ready  # type: ignore[method-assign,assignment]  # noqa: SLF001
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=migration_limit)
        releaser = app.state.proxy_state.proxy.kv
        release_soon = releaser.release_soon

        def logged(prefill: Instance, kv_transfer_params: Body) -> None:
            log.append(("release", "proxy", str(kv_transfer_params.get("remote_request_id"))))
            release_soon(prefill, kv_transfer_params)

        releaser.release_soon = logged
        proxy = stack.enter_context(ThreadServer(app, ports.free("proxy")))
        wait_for(lambda: all(i.state == "ready" for i in pool.instances), "the proxy to take every instance")
        pool.policy.choose = lambda role, candidates: candidates[0]  # type: ignore[method-assign]  # the first listed first
        yield proxy.url, prefill, pool


def _legs(log: Log, rid: str) -> list[tuple[str, str, str]]:
    return [e for e in log if e[2] == rid and e[0] in ("start", "end")]


def _released_after_every_leg_that_read_it(log: Log) -> None:
    """Every release comes after each leg that carried its held request ended, and no such leg starts after it."""
    for i, (event, _, rid) in enumerate(log):
        if event != "release":
            continue
        before, after = _legs(log[:i], rid), _legs(log[i + 1:], rid)
        started = [e[1] for e in before if e[0] == "start"]
        ended = [e[1] for e in before if e[0] == "end"]
        assert sorted(started) == sorted(ended), f"released {rid} under a decode leg that reads it: {log}"
        assert not after, f"released {rid}, then sent its params to a decode: {log}"


@pytest.mark.parametrize("migration_limit", [3, 0], ids=["migrating", "no-migration"])  # two paths to the retry
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("outcome", ["ok", "fail"])
def test_a_leg_retried_on_another_decode_is_released_only_after_that_leg_ended(stream: bool, outcome: str,
                                                                               migration_limit: int) -> None:
    log: Log = []
    with _deployment(log, {"decode-b": False}, dead_first=True, migration_limit=migration_limit) as (url, prefill,
                                                                                                   pool):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": outcome, "max_tokens": 4, "stream": stream},
                            timeout=30)
        held = prefill.legs[-1]
        assert {i.name: i.state for i in pool.instances}["decode-dead"] == "down"
        # The retry sent decode B the params of the prefill's hold, the very ones decode-dead was sent.
        assert ("start", "decode-b", held) in log, log
        if outcome == "ok":
            assert answer.status_code == 200, answer.text
            wait_for(lambda: ("end", "decode-b", held) in log, "decode B's leg to end")
            assert ("release", "proxy", held) not in log and held not in prefill.released
        else:
            assert answer.status_code == 502, answer.text  # the decode's failure, passed on
            wait_for(lambda: held in prefill.released, f"the proxy to release {held}", timeout=10)
            assert log.count(("release", "proxy", held)) == 1
    _released_after_every_leg_that_read_it(log)


def test_a_leg_migrated_off_a_stalled_decode_is_released_and_its_params_go_to_no_other_decode() -> None:
    log: Log = []
    with _deployment(log, {"decode-a": True, "decode-b": False}, dead_first=False,
                     health_timeout_s=2.0) as (url, prefill, _):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": "ok", "max_tokens": 4}, timeout=30)
        assert answer.status_code == 200, answer.text  # decode-b's whole answer, after decode-a stalled
        held = prefill.legs[-1]
        assert ("start", "decode-a", held) in log and ("start", "decode-b", NO_PARAMS) in log, log
        wait_for(lambda: held in prefill.released, f"the proxy to release {held}", timeout=10)
    assert log.index(("release", "proxy", held)) < log.index(("start", "decode-b", NO_PARAMS))
    assert not _legs(log[log.index(("release", "proxy", held)) + 1:], held), log
