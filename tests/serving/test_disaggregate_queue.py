"""Per-request disaggregation by prefill queue (proxy.disaggregate_max_queue_tokens, issue 31): while
every ready prefill has that many prompt tokens queued, a prompt that would go PD runs on its decode alone, up to
that many spilled tokens in flight per decode.

Fake instances over real HTTP behind the real proxy app: the prefill (and, where a case needs it, the decode)
holds each answer until the test opens its gate, so the queues the proxy counts are the ones the test builds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.disaggregate import DECODE_BUSY, DECODE_ONLY, PD, SPILLED, Disaggregation, spilled_on
from pdlaunch.proxy.instances import Instance, InstancePool
from tests.helpers.ports import free_port
from tests.serving.helpers import ThreadServer, wait_for

QUEUE = 20  # disaggregate_max_queue_tokens
PROMPT = list(range(100, 124))  # 24 token ids: >= QUEUE once one is queued
SHORT = list(range(300, 304))  # 4 token ids: < disaggregate_min_tokens
GATE_TIMEOUT_S = 60.0


class GatedInstance:
    """/health and /v1/completions; while `gate` is closed an answer waits for it (at most GATE_TIMEOUT_S). A
    decode's stream sends its first event, then waits for `tail` before the rest."""

    def __init__(self, role: str, name: str) -> None:
        self.role, self.name = role, name
        self.gate = threading.Event()
        self.gate.set()
        self.tail = threading.Event()
        self.tail.set()
        self.requests: list[dict[str, Any]] = []
        self.itl_ms: float | None = None  # reported by /health when set
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok", "engine_id": name}
                                | ({} if self.itl_ms is None else {"itl_ms": self.itl_ms}))
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        opened = await asyncio.to_thread(self.gate.wait, GATE_TIMEOUT_S)
        assert opened, f"{self.name}: the test never opened the gate"
        if self.role == "prefill":
            return {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "kv_transfer_params": {"do_remote_prefill": True, "remote_request_id": "r"}}
        if body.get("stream"):
            return StreamingResponse(self._events(), media_type="text/event-stream")
        return {"choices": [{"index": 0, "text": f"from {self.name}", "finish_reason": "length"}]}


    async def _events(self) -> AsyncIterator[bytes]:
        yield _event({"choices": [{"index": 0, "text": "first", "finish_reason": None}]})
        opened = await asyncio.to_thread(self.tail.wait, GATE_TIMEOUT_S)
        assert opened, f"{self.name}: the test never let the stream end"
        yield _event({"choices": [{"index": 0, "text": f" from {self.name}", "finish_reason": "length"}]})
        yield b"data: [DONE]\n\n"


def _event(chunk: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk)}\n\n".encode()


@pytest.fixture
def fleet() -> Iterator[tuple[str, GatedInstance, GatedInstance, Instance]]:
    """One prefill, one decode, a proxy with disaggregate_min_tokens 8 and the queue cap QUEUE; the last: the
    proxy's decode instance (whose spilled tokens the cap counts)."""
    with _fleet() as (url, prefill, decode, _, pool):
        yield url, prefill, decode, next(i for i in pool.instances if i.role == "decode")


@contextmanager
def _fleet(max_itl_ms: float | None = None) -> Iterator[tuple[str, GatedInstance, GatedInstance, Disaggregation,
                                                              InstancePool]]:
    prefill, decode = GatedInstance("prefill", "prefill-0"), GatedInstance("decode", "decode-0")
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(prefill.app, ports.free("prefill")) as p, ThreadServer(decode.app, ports.free("decode")) as d:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d.url, "decode-0")],
                            "round_robin")
        disaggregation = Disaggregation(8, resolve_model_path("tiny"), QUEUE, max_itl_ms=max_itl_ms)
        # migration off: a streamed decode leg is relayed as it comes (the fake's events carry no token ids)
        app = build_proxy_app(pool, 30.0, migration_limit=0, disaggregation=disaggregation,
                              tokenizer_dir=resolve_model_path("tiny"))
        try:
            with ThreadServer(app, ports.free("proxy")) as proxy:
                wait_for(lambda: all(i.state == "ready" for i in pool.instances), "both fake instances ready")
                yield proxy.url, prefill, decode, disaggregation, pool
        finally:
            prefill.gate.set()
            decode.gate.set()
            decode.tail.set()


def _post(url: str, prompt: list[int], request_id: str) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": prompt, "max_tokens": 4},
                      headers={"X-Request-Id": request_id}, timeout=GATE_TIMEOUT_S + 30)


def _decisions(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    prefix = "pdlaunch_proxy_disaggregation_decisions_total{decision=\""
    return {line[len(prefix):].split('"')[0]: float(line.split()[-1])
            for line in text.splitlines() if line.startswith(prefix)}


def _decodes() -> tuple[Instance, Instance]:
    return Instance("decode", "http://127.0.0.1:1", "d"), Instance("decode", "http://127.0.0.1:2", "e")


def test_the_decision_spills_only_past_the_queue_and_under_the_decodes_cap() -> None:
    d, e = _decodes()
    decider = Disaggregation(8, resolve_model_path("tiny"), QUEUE)
    assert decider.decision(4, prefill_queued=100, decode=d) == DECODE_ONLY  # short: decode alone regardless
    assert decider.decision(24, prefill_queued=QUEUE - 1, decode=d) == PD
    assert decider.decision(24, prefill_queued=QUEUE, decode=d) == SPILLED
    release = decider.spill(d, QUEUE)
    assert decider.decision(24, prefill_queued=QUEUE, decode=d) == PD  # d's cap is full
    assert decider.decision(24, prefill_queued=QUEUE, decode=e) == SPILLED  # another decode's is not
    release()
    release()  # once: a second call changes nothing
    assert spilled_on(d) == 0 and decider.decision(24, prefill_queued=QUEUE, decode=d) == SPILLED
    assert Disaggregation(8, resolve_model_path("tiny")).decision(24, prefill_queued=10**6, decode=d) == PD
    with pytest.raises(ValueError, match="disaggregate_min_tokens"):
        Disaggregation(None, resolve_model_path("tiny"), QUEUE)


def test_a_full_prefill_queue_sends_the_next_prompt_to_the_decode_alone(
        fleet: tuple[str, GatedInstance, GatedInstance, Instance], caplog: pytest.LogCaptureFixture) -> None:
    url, prefill, decode, decode_instance = fleet
    prefill.gate.clear()
    with ThreadPoolExecutor(2) as pool, caplog.at_level(logging.DEBUG, logger="pdlaunch.proxy"):
        first: Future[httpx.Response] = pool.submit(_post, url, PROMPT, "first")
        wait_for(lambda: len(prefill.requests) == 1, "the first prompt's prefill leg to reach the held prefill")
        # 24 tokens queued on the only prefill >= 20: the next PD prompt runs on the decode, no KV moved.
        second = _post(url, PROMPT, "second")
        assert second.status_code == 200, second.text
        assert second.json()["choices"][0]["text"] == "from decode-0"
        assert "kv_transfer_params" not in decode.requests[-1] and len(prefill.requests) == 1
        # a short prompt is decode-only as before; the queue does not change that
        assert _post(url, SHORT, "short").status_code == 200
        prefill.gate.set()
        answer = first.result(timeout=GATE_TIMEOUT_S)
    assert answer.status_code == 200 and answer.json()["choices"][0]["text"] == "from decode-0"
    assert decode.requests[-1]["kv_transfer_params"]["do_remote_prefill"] is True  # the first went PD, last
    assert _decisions(url) == {"pd": 1.0, "spilled": 1.0, "decode_only": 1.0}
    assert "request second /v1/completions via spilled (24 prompt tokens, 0 cached on decode-0, 24 uncached; " \
        "disaggregate_min_tokens 8; prefill queue 24 tokens, disaggregate_max_queue_tokens 20) " \
        "-> decode-0: ok" in caplog.text
    wait_for(lambda: spilled_on(decode_instance) == 0, "the spilled request's tokens to be released")


def test_a_decode_at_its_spill_cap_leaves_the_next_prompt_to_the_prefill_queue(
        fleet: tuple[str, GatedInstance, GatedInstance, Instance]) -> None:
    url, prefill, decode, decode_instance = fleet
    prefill.gate.clear()
    decode.gate.clear()
    with ThreadPoolExecutor(3) as pool:
        first = pool.submit(_post, url, PROMPT, "first")
        wait_for(lambda: len(prefill.requests) == 1, "the first prompt's prefill leg to reach the held prefill")
        spilled = pool.submit(_post, url, PROMPT, "spilled")
        wait_for(lambda: len(decode.requests) == 1, "the spilled prompt to reach the held decode")
        assert spilled_on(decode_instance) == len(PROMPT)  # >= QUEUE: the decode's cap is reached
        third = pool.submit(_post, url, PROMPT, "third")
        wait_for(lambda: len(prefill.requests) == 2, "the third prompt to queue for the prefill")
        prefill.gate.set()
        decode.gate.set()
        answers = [f.result(timeout=GATE_TIMEOUT_S) for f in (first, spilled, third)]
    assert all(a.status_code == 200 for a in answers), [a.text for a in answers]
    assert _decisions(url) == {"pd": 2.0, "spilled": 1.0}
    wait_for(lambda: spilled_on(decode_instance) == 0, "the spilled request's tokens to be released")


def test_a_spilled_stream_holds_the_decodes_cap_until_it_ends(
        fleet: tuple[str, GatedInstance, GatedInstance, Instance]) -> None:
    """The cap counts a spilled request until its answer ends, not only until its first token: released at the
    first token, twice the prompts spilled on 2x H200 and the decode's TPOT went past the SLO (RESULTS.md,
    twenty-seventh session)."""
    url, prefill, decode, decode_instance = fleet
    prefill.gate.clear()
    decode.tail.clear()
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_post, url, PROMPT, "first")
        wait_for(lambda: len(prefill.requests) == 1, "the first prompt's prefill leg to reach the held prefill")
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "stream": True},
                          timeout=GATE_TIMEOUT_S + 30) as stream:
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert '"text": "first"' in next(line for line in lines if line.startswith("data:"))
            assert spilled_on(decode_instance) == len(PROMPT)  # streaming: still counted
            third = pool.submit(_post, url, PROMPT, "third")  # the cap is full: it queues for the prefill
            wait_for(lambda: len(prefill.requests) == 2, "the third prompt to queue for the prefill")
            decode.tail.set()
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
        wait_for(lambda: spilled_on(decode_instance) == 0, "the ended stream to leave the cap")
        prefill.gate.set()
        assert first.result(timeout=GATE_TIMEOUT_S).status_code == 200
        assert third.result(timeout=GATE_TIMEOUT_S).status_code == 200
    assert _decisions(url) == {"pd": 2.0, "spilled": 1.0}


@pytest.mark.parametrize(("field", "value", "refusals"), [
    ("disaggregate_max_queue_tokens", 4096, [
        (["--disaggregate-max-queue-tokens", "10"], "give --disaggregate-min-tokens"),
        (["--disaggregate-min-tokens", "4", "--disaggregate-max-queue-tokens", "0"], "must be 1 or more")]),
    ("disaggregate_max_itl_ms", 8.5, [
        (["--disaggregate-max-itl-ms", "9"], "give --disaggregate-min-tokens"),
        (["--disaggregate-min-tokens", "4", "--disaggregate-max-itl-ms", "0"], "positive number of milliseconds"),
        (["--disaggregate-min-tokens", "4", "--disaggregate-max-itl-ms", "nan"], "positive number of milliseconds")]),
])
def test_the_launcher_passes_a_load_rule_and_the_proxy_refuses_it_alone(
        field: str, value: float, refusals: list[tuple[list[str], str]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg = DeploymentConfig.model_validate({
        "model": {"path": "tiny"}, "device": "cpu",
        "proxy": {"port": free_port(), "disaggregate_min_tokens": 64, field: value}})
    args = parse_args(Deployment(cfg, log_dir=tmp_path)._proxy_argv()[3:])  # noqa: SLF001
    assert (args.disaggregate_min_tokens, getattr(args, field)) == (64, value)
    base = ["--prefill", "http://127.0.0.1:1", "--decode", "http://127.0.0.1:2", "--tokenizer", "tiny"]
    for extra, message in refusals:
        with pytest.raises(SystemExit):
            parse_args(base + extra)
        assert message in capsys.readouterr().err


def test_a_decode_without_tpot_headroom_sends_what_it_would_compute_pd() -> None:
    d, _ = _decodes()
    decider = Disaggregation(8, resolve_model_path("tiny"), QUEUE, max_itl_ms=9.0)
    assert decider.decision(4, decode=d, decode_itl_ms=8.9) == DECODE_ONLY
    assert decider.decision(4, decode=d, decode_itl_ms=9.0) == DECODE_BUSY  # at the threshold: no headroom
    assert decider.decision(12, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED
    assert decider.decision(12, prefill_queued=QUEUE, decode=d, decode_itl_ms=12.0) == DECODE_BUSY
    assert decider.decision(24, prefill_queued=0, decode=d, decode_itl_ms=12.0) == PD  # PD anyway: plain PD
    assert Disaggregation(8, resolve_model_path("tiny")).decision(4, decode_itl_ms=1e6) == DECODE_ONLY  # unset
    # "idle" from a /health that predates the requests the proxy has on the decode now: not known to have room
    assert decider.decision(4, decode=d, decode_itl_ms=0.0, decode_in_flight=0) == DECODE_ONLY
    assert decider.decision(4, decode=d, decode_itl_ms=0.0, decode_in_flight=3) == DECODE_BUSY
    assert decider.decision(12, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0, decode_in_flight=1) == \
        DECODE_BUSY
    assert decider.decision(4, decode=d, decode_itl_ms=6.0, decode_in_flight=3) == DECODE_ONLY  # measured room
    # a decode that reports no itl_ms (another server) is never held to be busy
    assert decider.decision(4, decode=d, decode_itl_ms=None, decode_in_flight=3) == DECODE_ONLY
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="disaggregate_max_itl_ms"):
            Disaggregation(8, resolve_model_path("tiny"), max_itl_ms=bad)
    with pytest.raises(ValueError, match="disaggregate_max_itl_ms"):
        Disaggregation(None, None, max_itl_ms=9.0)


def test_with_a_tpot_rule_the_spill_cap_bounds_the_prompts_on_the_decode_this_one_included() -> None:
    """Without disaggregate_max_itl_ms a prompt spills while the decode holds fewer than Q spilled tokens (a 24-token
    prompt past Q = 20 does); with it, only while those and the prompt together stay within Q."""
    d, e = _decodes()
    plain = Disaggregation(8, resolve_model_path("tiny"), QUEUE)
    assert plain.decision(24, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED
    plain.spill(d, 12)
    assert plain.decision(12, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED  # 12 < 20 before it
    d, e = _decodes()  # nothing spilled yet (the count is the instance's)
    ruled = Disaggregation(8, resolve_model_path("tiny"), QUEUE, max_itl_ms=9.0)
    assert ruled.decision(24, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == PD  # 24 > 20 alone
    assert ruled.decision(QUEUE, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED  # exactly Q
    release = ruled.spill(d, 12)
    assert ruled.decision(8, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED  # 12 + 8 = Q
    assert ruled.decision(9, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == PD  # 12 + 9 > Q
    assert ruled.decision(9, prefill_queued=QUEUE, decode=e, decode_itl_ms=0.0) == SPILLED  # another decode
    release()
    assert ruled.decision(12, prefill_queued=QUEUE, decode=d, decode_itl_ms=0.0) == SPILLED


def test_the_log_line_says_why_a_decode_had_no_headroom() -> None:
    from pdlaunch.proxy.prompt_request import _busy

    assert _busy(9.126, 4) == "streams at 9.13 ms a token"
    assert _busy(0.0, 3) == "has 3 requests in flight that its last /health (idle) predates"


def test_the_proxy_keeps_prompts_off_a_decode_without_headroom() -> None:
    """Through the proxy, with --disaggregate-max-itl-ms 9: a short prompt runs on the decode alone while its
    /health says idle and nothing of the proxy's is on it; goes PD while the proxy has a stream on it that the idle
    reading predates, and while the decode reports 12 ms a token; runs there again at 3 ms."""
    with _fleet(max_itl_ms=9.0) as (url, prefill, decode, _, pool):
        decode_instance = next(i for i in pool.instances if i.role == "decode")

        def reports(itl_ms: float) -> None:
            decode.itl_ms = itl_ms
            wait_for(lambda: decode_instance.itl_ms == itl_ms, f"the proxy to read itl_ms {itl_ms} from /health")

        reports(0.0)
        assert _post(url, SHORT, "idle").status_code == 200
        decode.tail.clear()
        with httpx.stream("POST", f"{url}/v1/completions", json={"prompt": SHORT, "max_tokens": 4, "stream": True},
                          timeout=GATE_TIMEOUT_S + 30) as stream:  # a decode-alone stream, held open
            assert stream.status_code == 200
            lines = stream.iter_lines()
            assert '"text": "first"' in next(line for line in lines if line.startswith("data:"))
            assert decode_instance.in_flight == 1 and decode_instance.itl_ms == 0.0
            assert _post(url, SHORT, "stale").status_code == 200  # idle per /health, but 1 stream in flight
            assert len(prefill.requests) == 1
            decode.tail.set()
            assert [line for line in lines if line.startswith("data:")][-1] == "data: [DONE]"
        wait_for(lambda: decode_instance.in_flight == 0, "the held stream to end")
        reports(12.0)
        assert 'pdlaunch_proxy_instance_itl_milliseconds{instance="decode-0",role="decode"} 12.0' in \
            httpx.get(f"{url}/metrics", timeout=10).text
        assert _post(url, SHORT, "slow").status_code == 200
        assert len(prefill.requests) == 2
        reports(3.0)
        assert _post(url, SHORT, "room").status_code == 200
        assert len(prefill.requests) == 2
        assert _decisions(url) == {"decode_only": 3.0, "pd_decode_busy": 2.0}
