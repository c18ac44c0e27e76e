"""Prefix-aware routing and disaggregation by uncached tokens (issue 31) against fake instances whose
`GET /v1/kv_events` serves scripted NDJSON (kvcache/events.py's contract), over real HTTP.

The proxy follows each instance's events (proxy/kv_events.py): its cached set follows snapshot / stored /
removed, a bad line or a seq gap forgets the set and re-opens the stream (never a crash), a stream that ends
is re-opened. Routing (proxy/prefix.py): the longest cached prefix wins, weighed against queued tokens;
a request whose uncached tokens on the chosen decode are fewer than disaggregate_min_tokens runs there alone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse
from typer.testing import CliRunner

from pdlaunch.cli import app
from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER, internal_headers
from pdlaunch.kvcache.events import KvRemoved, KvSnapshot, KvStored, prompt_block_hashes
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.disaggregate import Disaggregation, PromptTokens
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.kv_events import CachedBlocks, KvEventFeed
from pdlaunch.proxy.prefix import PrefixRouter, PromptBlocks, queued
from pdlaunch.proxy.state import ProxyState
from tests.serving.helpers import ThreadServer, follow_decode_feed, wait_for

BLOCK = 4
SECRET = "prefix-routing-test-secret-0123"
HOLD = "hold"  # a script entry: keep the stream open until the test ends, with heartbeats as an instance
SILENT = "silent"  # the same without heartbeats (a half-open connection, a stopped instance)


def _line(event: KvSnapshot | KvStored | KvRemoved) -> str:
    return event.model_dump_json()


class FakeInstance:
    """/health, /v1/completions (a prefill answers with kv_transfer_params, a decode with text) and
    /v1/kv_events: connection k serves `scripts[k]` (the last script again for later connections)."""

    def __init__(self, role: str, name: str, scripts: list[list[str]]) -> None:
        self.role, self.name, self.scripts = role, name, scripts
        self.connections = 0
        self.requests: list[dict[str, Any]] = []
        self.event_headers: list[str | None] = []
        self.stop = threading.Event()
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok", "engine_id": name})
        self.app.post("/v1/completions")(self.completions)
        self.app.get("/v1/kv_events")(self.kv_events)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.requests.append(body)
        if self.role == "prefill":
            return {"choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                    "kv_transfer_params": {"do_remote_prefill": True, "remote_request_id": "r"}}
        return {"choices": [{"index": 0, "text": f"from {self.name}", "finish_reason": "length"}]}

    async def kv_events(self, request: Request) -> Any:
        self.event_headers.append(request.headers.get(INTERNAL_TOKEN_HEADER))
        script = self.scripts[min(self.connections, len(self.scripts) - 1)]
        self.connections += 1

        async def lines() -> AsyncIterator[bytes]:
            for line in script:
                if line in (HOLD, SILENT):
                    beat = asyncio.get_running_loop().time()
                    while not self.stop.is_set():
                        await asyncio.sleep(0.05)
                        if line == HOLD and asyncio.get_running_loop().time() - beat >= 1.0:
                            beat = asyncio.get_running_loop().time()
                            yield b"\n"  # the heartbeat of an idle instance
                    return
                yield (line + "\n").encode()

        return StreamingResponse(lines(), media_type="application/x-ndjson")


def _snapshot(engine_id: str, hashes: list[str]) -> str:
    return _line(KvSnapshot(seq=0, engine_id=engine_id, block_size=BLOCK, hashes=hashes))


PROMPT = list(range(100, 124))  # 24 token ids: 6 blocks of 4
SHORT = list(range(300, 312))  # 12 token ids: 3 blocks
H, S = prompt_block_hashes(PROMPT, BLOCK), prompt_block_hashes(SHORT, BLOCK)


@pytest.fixture(scope="module")
def fleet() -> Iterator[tuple[str, dict[str, FakeInstance], ProxyState]]:
    """2 prefills + 2 decodes behind a prefix-routing proxy with disaggregate_min_tokens 12."""
    fakes = {
        # prefill-0 caches PROMPT's first 4 blocks, prefill-1 its first block
        "prefill-0": FakeInstance("prefill", "prefill-0", [[_snapshot("prefill-0", H[:4]), HOLD]]),
        "prefill-1": FakeInstance("prefill", "prefill-1", [[_snapshot("prefill-1", H[:1]), HOLD]]),
        # decode-0: PROMPT's first block, then (an event) two more; decode-1: SHORT's first 2 blocks
        "decode-0": FakeInstance("decode", "decode-0", [[_snapshot("decode-0", H[:1]),
                                                         _line(KvStored(seq=1, hashes=H[1:3])), HOLD]]),
        "decode-1": FakeInstance("decode", "decode-1", [[_snapshot("decode-1", S[:2]), HOLD]]),
    }
    ports = PortAllocator("127.0.0.1")
    servers = [ThreadServer(f.app, ports.free(name)) for name, f in fakes.items()]
    for server in servers:
        server.__enter__()
    try:
        pool = InstancePool([Instance(f.role, s.url, name)
                             for (name, f), s in zip(fakes.items(), servers)], "prefix")
        app = build_proxy_app(pool, 10.0, deployment_secret=SECRET,
                              disaggregation=Disaggregation(12, resolve_model_path("tiny")))
        with ThreadServer(app, ports.free("proxy")) as proxy:
            state: ProxyState = app.state.proxy_state
            feed = state.router.feed
            assert feed is not None
            wait_for(lambda: all(c.block_size for c in feed.cached.values()) and
                     len(feed.cached["decode-0"].hashes) == 3, "the proxy to follow every instance's events")
            yield proxy.url, fakes, state
    finally:
        for fake in fakes.values():
            fake.stop.set()
        for server in servers:
            server.__exit__()


def _metric(url: str, name: str) -> float:
    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_the_proxy_follows_each_instance_with_the_internal_token(fleet: Any) -> None:
    _, fakes, state = fleet
    cached = state.router.feed.cached
    assert cached["decode-0"].hashes == set(H[:3]) and cached["decode-0"].seq == 1
    assert cached["prefill-0"].hashes == set(H[:4]) and cached["prefill-0"].engine_id == "prefill-0"
    token = internal_headers(SECRET)[INTERNAL_TOKEN_HEADER]
    assert all(f.event_headers and set(f.event_headers) == {token} for f in fakes.values())


def test_a_prompt_goes_to_the_longest_cached_prefix_and_is_counted(fleet: Any,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    url, fakes, _ = fleet
    before = {name: len(f.requests) for name, f in fakes.items()}
    routed, matched = _metric(url, "pdlaunch_proxy_prefix_routed_total"), \
        _metric(url, "pdlaunch_proxy_prefix_matched_tokens_total")
    with caplog.at_level(logging.DEBUG, logger="pdlaunch.proxy"):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": PROMPT, "max_tokens": 4},
                            headers={"X-Request-Id": "long-1"}, timeout=10)
    assert answer.status_code == 200, answer.text
    # the request's line says what each choice weighed, not only where it went
    assert "request long-1 /v1/completions via prefix decode-0 (12 of 24 prompt tokens cached, 0 queued) -> pd " \
        "(24 prompt tokens, 12 cached on decode-0, 12 uncached; disaggregate_min_tokens 12) -> prefix prefill-0 " \
        "(16 of 24 prompt tokens cached, 0 queued) -> prefill-0 -> decode-0: ok" in caplog.text
    # decode-0 caches 3 blocks (12 tokens) of 24: 12 uncached >= 12, so PD; prefill-0 caches 4 blocks.
    assert answer.json()["choices"][0]["text"] == "from decode-0"
    got = {name: len(f.requests) - before[name] for name, f in fakes.items()}
    assert got == {"prefill-0": 1, "prefill-1": 0, "decode-0": 1, "decode-1": 0}
    assert fakes["decode-0"].requests[-1]["kv_transfer_params"]["do_remote_prefill"] is True
    assert _metric(url, "pdlaunch_proxy_prefix_routed_total") - routed == 2
    assert _metric(url, "pdlaunch_proxy_prefix_matched_tokens_total") - matched == 12 + 16


def test_few_uncached_tokens_on_the_chosen_decode_run_there_alone(fleet: Any,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    url, fakes, _ = fleet
    before = {name: len(f.requests) for name, f in fakes.items()}
    decode_only = _metric(url, 'pdlaunch_proxy_disaggregation_decisions_total{decision="decode_only"}')
    # SHORT: 12 tokens, decode-1 caches 8 of them: 4 uncached < 12, though the prompt alone is not < 12.
    with caplog.at_level(logging.DEBUG, logger="pdlaunch.proxy"):
        answer = httpx.post(f"{url}/v1/completions", json={"prompt": SHORT, "max_tokens": 4},
                            headers={"X-Request-Id": "short-1"}, timeout=10)
    assert "request short-1 /v1/completions via prefix decode-1 (8 of 12 prompt tokens cached, 0 queued) -> " \
        "decode_only (12 prompt tokens, 8 cached on decode-1, 4 uncached; disaggregate_min_tokens 12) -> decode-1: ok" \
        in caplog.text
    assert answer.status_code == 200, answer.text
    assert answer.json()["choices"][0]["text"] == "from decode-1"
    got = {name: len(f.requests) - before[name] for name, f in fakes.items()}
    assert got == {"prefill-0": 0, "prefill-1": 0, "decode-0": 0, "decode-1": 1}
    assert "kv_transfer_params" not in fakes["decode-1"].requests[-1]
    assert _metric(url, 'pdlaunch_proxy_disaggregation_decisions_total{decision="decode_only"}') == decode_only + 1


def test_queued_tokens_weigh_against_a_cached_prefix() -> None:
    """score = matched - ALPHA * queued: a hot prefix moves on once the work piled on its instance outweighs it."""
    instances = [Instance("prefill", f"http://127.0.0.1:{9 + i}", f"prefill-{i}", state="ready") for i in range(2)]
    pool = InstancePool(instances, "prefix")
    feed = KvEventFeed(instances, {})
    feed.cached["prefill-0"] = CachedBlocks(set(H[:4]), BLOCK, "", 0)  # 16 of PROMPT's tokens
    feed.cached["prefill-1"] = CachedBlocks(set(), BLOCK, "", 0)
    router = PrefixRouter(pool, feed, PromptTokens(resolve_model_path("tiny")), by_prefix=True)
    prompt = PromptBlocks(PROMPT)
    first = router.choose("prefill", prompt)
    assert (first.instance.name, first.matched_tokens, first.by_prefix) == ("prefill-0", 16, True)
    release = router.enqueue(first.instance, 8)  # 16 - 8 = 8 > 0: still prefill-0
    assert router.choose("prefill", prompt).instance.name == "prefill-0"
    release_more = router.enqueue(first.instance, 9)  # 16 - 17 < 0: prefill-1 now
    assert router.choose("prefill", prompt).instance.name == "prefill-1"
    release_more()
    release_more()  # a second call does nothing
    release()
    assert [queued(i) for i in instances] == [0, 0]
    # An instance whose /health names another engine than its events (restarted, stream not caught up): unused.
    instances[0].engine_id = "restarted"
    feed.cached["prefill-0"].engine_id = "before"
    assert router.matched_tokens(instances[0], prompt) == 0


def test_bad_lines_gaps_and_ended_streams_reopen_the_stream_and_never_crash() -> None:
    scripts = [
        [_snapshot("e", H[:2]), "{not json"],  # a bad line: forgotten, re-opened
        [_snapshot("e", H[:2]), _line(KvStored(seq=2, hashes=H[2:3]))],  # seq 2 after 0: a gap
        [_line(KvStored(seq=1, hashes=H[2:3]))],  # an event before any snapshot
        [_snapshot("e", H[:3]), _line(KvRemoved(seq=1, hashes=H[:1]))],  # then the stream ends
        [_snapshot("e", H[1:3]), _line(KvStored(seq=1, hashes=H[3:5])), HOLD],
    ]
    fake = FakeInstance("decode", "e", scripts)
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(fake.app, ports.free("fake")) as server:
        # 5 streams, re-opened after 0.5 + 1 + 2 + 4 s of backoff at most
        hashes = follow_decode_feed(server.url, lambda cached: fake.connections >= 5 and cached.seq == 1, fake.stop)
        assert hashes == set(H[1:5])
    assert fake.connections == 5


def test_a_silent_stream_is_forgotten_and_reopened(monkeypatch: pytest.MonkeyPatch) -> None:
    """No line, not even a heartbeat, for READ_TIMEOUT_S: the stream is dead though its connection stays
    open; the set is forgotten and the stream re-opened. A stream that sends heartbeats is kept."""
    import pdlaunch.proxy.kv_events as feed_module

    monkeypatch.setattr(feed_module, "READ_TIMEOUT_S", 2.0)
    fake = FakeInstance("decode", "e", [[_snapshot("e", H[:2]), SILENT], [_snapshot("e", H[:4]), HOLD]])
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(fake.app, ports.free("fake")) as server:
        instance = Instance("decode", server.url, "decode-0", state="ready")
        feed = KvEventFeed([instance], {})

        async def follow() -> tuple[set[str], set[str], int]:
            async with httpx.AsyncClient() as client:
                feed.start(client)
                try:
                    for _ in range(400):  # the first set, then (2 s of silence + 0.5 s backoff) the second
                        if set(feed.cached["decode-0"].hashes) == set(H[:2]):
                            break
                        await asyncio.sleep(0.05)
                    first = set(feed.cached["decode-0"].hashes)
                    for _ in range(600):
                        if set(feed.cached["decode-0"].hashes) == set(H[:4]):
                            break
                        await asyncio.sleep(0.05)
                    second = set(feed.cached["decode-0"].hashes)
                    # heartbeats every second keep the second stream (and its set) past three read timeouts
                    for _ in range(130):
                        await asyncio.sleep(0.05)
                    return first, second, fake.connections
                finally:
                    await feed.stop()
                    fake.stop.set()

        first, second, connections = asyncio.run(follow())
    assert first == set(H[:2]) and second == set(H[:4])
    assert connections == 2


def test_prefix_policy_needs_the_tokenizer_and_the_launcher_gives_it(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--prefill", "http://a:1", "--decode", "http://b:2", "--routing-policy", "prefix"])
    cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"},
                                           "proxy": {"port": 0, "routing_policy": "prefix"}})
    args = parse_args(Deployment(cfg, log_dir=tmp_path)._proxy_argv()[3:])  # noqa: SLF001
    assert (args.routing_policy, args.tokenizer, args.disaggregate_min_tokens) == \
        ("prefix", resolve_model_path("tiny"), None)
    with pytest.raises(ValueError, match="tokenizer"):
        build_proxy_app(InstancePool([], "prefix"), 1.0)


def test_a_rendered_proxy_gets_the_tokenizer_for_prefix_routing(tmp_path: Path) -> None:
    out = tmp_path / "manifests"
    result = CliRunner().invoke(app, ["render", "kubernetes", "--model", "tiny", "--device", "cuda", "--routing-policy",
                                      "prefix", "--out", str(out), "--image", "pdlaunch:test"])
    assert result.exit_code == 0, result.output
    manifests = [yaml.safe_load(path.read_text()) for path in sorted(out.glob("*.yaml"))]
    proxy = next(m for m in manifests if m["kind"] == "Deployment" and m["metadata"]["name"].endswith("-proxy"))
    args = proxy["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--routing-policy") + 1] == "prefix" and args[args.index("--tokenizer") + 1] == "tiny"
    assert parse_args(args).tokenizer == resolve_model_path("tiny")  # the proxy resolves it as --model


def test_prompts_the_prefix_policy_cannot_hash_go_to_an_instance_whole() -> None:
    """Colocated, a list of prompts is one request to one instance (only PD splits it): the prefix policy
    has no single prompt to hash there and leaves the choice to the pool, rather than answering a 400;
    token ids past int64 (no model's) are the instance's to refuse, not a 500 of the proxy's hashing."""
    fake = FakeInstance("colocated", "colocated-0", [[_snapshot("colocated-0", []), HOLD]])
    ports = PortAllocator("127.0.0.1")
    try:
        with ThreadServer(fake.app, ports.free("colocated-0")) as server:
            app = build_proxy_app(InstancePool([Instance("colocated", server.url, "colocated-0")], "prefix"), 10.0,
                                  deployment_secret=SECRET, tokenizer_dir=resolve_model_path("tiny"))
            with ThreadServer(app, ports.free("proxy")) as proxy:
                # a list of prompts; token ids no model has (the instance judges them: no 500 at the proxy)
                for prompt in (["hello", "world"], [[1, 2, 3], [4, 5]], [2**70] * 8):
                    answer = httpx.post(f"{proxy.url}/v1/completions", timeout=30,
                                        json={"model": "tiny", "prompt": prompt, "max_tokens": 2})
                    assert answer.status_code == 200, answer.text
                    assert fake.requests[-1]["prompt"] == prompt
    finally:
        fake.stop.set()


def test_a_stream_naming_more_cached_blocks_than_its_cache_has_is_forgotten() -> None:
    """The snapshot says how many blocks the instance's cache has: a set that grows past them (a broken or
    hostile instance) is dropped rather than kept growing in the proxy's memory."""
    cached = CachedBlocks()
    assert cached.apply(KvSnapshot(seq=0, engine_id="e", block_size=BLOCK, hashes=H[:2], num_blocks=3)) is None
    assert cached.apply(KvStored(seq=1, hashes=H[2:3])) is None and len(cached.hashes) == 3
    assert cached.apply(KvRemoved(seq=2, hashes=H[:1])) is None
    assert cached.apply(KvStored(seq=3, hashes=H[3:4])) is None  # 3 again
    assert cached.apply(KvStored(seq=4, hashes=H[4:5])) == "4 cached blocks, more than the 3 its cache has"
    assert CachedBlocks().apply(KvSnapshot(seq=0, engine_id="e", block_size=BLOCK, hashes=H[:4], num_blocks=2))
    unbounded = CachedBlocks()  # an instance from before the field: no bound, as before
    assert unbounded.apply(KvSnapshot(seq=0, engine_id="e", block_size=BLOCK, hashes=H[:4])) is None

