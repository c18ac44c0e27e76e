"""GET /v1/kv_events on a real instance (engine thread + HTTP API, tiny model): the snapshot, then the
prompt's block hashes as `stored`, their `removed` once a small cache reuses the blocks; the API key
guards it as it guards /info; a client that leaves is unsubscribed; an idle stream sends heartbeats; clients open a
bounded number of streams, the deployment's own processes any; a HEAD answers without a stream."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import internal_headers
from pdlaunch.kvcache.events import KV_EVENT, KvSnapshot, KvStored, hash_hex, prompt_block_hashes
from pdlaunch.proxy.kv_events import CachedBlocks
from pdlaunch.server import kv_events
from pdlaunch.server.engine_loop import EngineLoop
from tests.serving.helpers import in_process_instance, wait_for

SECRET = "test-deployment-secret-kv-events-0123"
API_KEY = "test-key-kv-events"
BLOCK_SIZE = 16
NUM_BLOCKS = 8


@pytest.fixture(scope="module")
def server() -> Iterator[tuple[str, EngineLoop]]:
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "max_model_len": 128},
        "cache": {"num_gpu_blocks": NUM_BLOCKS, "block_size": BLOCK_SIZE},
        "security": {"deployment_secret": SECRET, "api_key": API_KEY},
    })
    with in_process_instance(cfg, "kv-events-0") as (url, loop):
        yield url, loop


def _complete(url: str, prompt: list[int]) -> None:
    response = httpx.post(f"{url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                          json={"model": "tiny", "prompt": prompt, "max_tokens": 2, "temperature": 0.0})
    assert response.status_code == 200, response.text


def test_stream_names_stored_then_removed_blocks(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    assert httpx.get(f"{url}/v1/kv_events").status_code == 401  # as /info: the key or the internal token
    first = list(range(10, 50))  # 40 tokens: two full blocks
    with httpx.stream("GET", f"{url}/v1/kv_events", headers=internal_headers(SECRET), timeout=60) as stream:
        assert stream.status_code == 200 and stream.headers["content-type"].startswith("application/x-ndjson")
        lines = (line for line in stream.iter_lines() if line)  # empty lines: heartbeats of an idle stream
        snapshot = KV_EVENT.validate_json(next(lines))
        assert isinstance(snapshot, KvSnapshot) and snapshot.seq == 0
        assert snapshot.engine_id == "kv-events-0" and snapshot.block_size == BLOCK_SIZE
        manager = loop.engine.block_manager
        assert snapshot.num_blocks == manager.pools[manager.event_group].num_blocks  # the proxy's bound
        cached = set(snapshot.hashes)
        _complete(url, first)
        wanted = prompt_block_hashes(first, BLOCK_SIZE)
        seq = 0
        while not set(wanted) <= cached:
            event = KV_EVENT.validate_json(next(lines))
            assert event.seq == seq + 1 and event.type in ("stored", "removed")
            seq = event.seq
            cached = cached | set(event.hashes) if event.type == "stored" else cached - set(event.hashes)
        _complete(url, list(range(100, 220)))  # 120 tokens + 2: all 8 blocks, so both are reused
        while set(wanted) & cached:
            event = KV_EVENT.validate_json(next(lines))
            assert event.seq == seq + 1
            seq = event.seq
            cached = cached | set(event.hashes) if event.type == "stored" else cached - set(event.hashes)
        assert loop.engine.block_manager.events.num_subscribers == 1
    # The client left: its subscription ends with the stream (polled: the server notices asynchronously).
    wait_for(lambda: loop.engine.block_manager.events.num_subscribers == 0, "the stream's unsubscribe", 30)


def test_a_new_stream_starts_from_what_is_cached(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    prompt = list(range(300, 340))
    _complete(url, prompt)
    with httpx.stream("GET", f"{url}/v1/kv_events", headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=60) as stream:
        snapshot = KV_EVENT.validate_json(next(stream.iter_lines()))
        assert isinstance(snapshot, KvSnapshot)
        assert set(prompt_block_hashes(prompt, BLOCK_SIZE)) <= set(snapshot.hashes)
        # the engine is idle: the snapshot is the whole cache
        assert set(snapshot.hashes) == {hash_hex(h) for h in loop.engine.block_manager.events.cached_counts()}


def test_an_idle_stream_sends_heartbeats(server: tuple[str, EngineLoop], monkeypatch: pytest.MonkeyPatch) -> None:
    from pdlaunch.kvcache import events

    monkeypatch.setattr(events, "HEARTBEAT_S", 0.3)
    url, _ = server
    with httpx.stream("GET", f"{url}/v1/kv_events", headers=internal_headers(SECRET), timeout=60) as stream:
        lines = stream.iter_lines()
        assert isinstance(KV_EVENT.validate_json(next(lines)), KvSnapshot)
        assert [next(lines), next(lines)] == ["", ""]  # nothing cached changes: two heartbeats, nothing else


def test_clients_open_a_bounded_number_of_streams_the_deployment_any(server: tuple[str, EngineLoop],
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(kv_events, "MAX_SUBSCRIBERS", 2)
    url, loop = server
    client = {"Authorization": f"Bearer {API_KEY}"}
    events = loop.engine.block_manager.events
    lines: list[Iterator[str]] = []  # each open stream's reader: one dropped closes its stream

    def opened(streams: ExitStack, headers: dict[str, str]) -> httpx.Response:
        stream = streams.enter_context(httpx.stream("GET", f"{url}/v1/kv_events", headers=headers, timeout=60))
        if stream.status_code == 200:
            lines.append(stream.iter_lines())
            assert isinstance(KV_EVENT.validate_json(next(lines[-1])), KvSnapshot)  # subscribed by then
        return stream

    with ExitStack() as streams:
        assert [opened(streams, client).status_code for _ in range(2)] == [200, 200]
        refused = opened(streams, client)
        assert refused.status_code == 503, "a third client stream was opened"
        error = refused.read() and refused.json()["error"]
        assert error["code"] == "too_many_subscribers", error
        assert error["message"] == ("2 streams of this instance's KV events are open; a client opens one while fewer "
                                    "than 2 are: close one and retry"), error
        assert opened(streams, internal_headers(SECRET)).status_code == 200  # the proxy's feed is never refused
        assert events.num_subscribers == 3
    lines.clear()
    wait_for(lambda: events.num_subscribers == 0, "the streams' unsubscribes", 30)
    with ExitStack() as streams:
        assert opened(streams, client).status_code == 200  # closed streams free their places


def test_a_head_answers_the_headers_and_opens_no_stream(server: tuple[str, EngineLoop]) -> None:
    url, loop = server
    events = loop.engine.block_manager.events
    wait_for(lambda: events.num_subscribers == 0, "the earlier tests' streams to close", 30)
    with httpx.Client(headers=internal_headers(SECRET), timeout=60) as client:
        head = client.head(f"{url}/v1/kv_events")
        assert head.status_code == 200 and head.headers["content-type"].startswith("application/x-ndjson")
        # the same connection serves the next request: the HEAD's answer ended (a stream never did)
        assert client.get(f"{url}/health").status_code == 200
        assert events.num_subscribers == 0


def test_a_large_cache_opens_the_stream_in_lines_of_bounded_size(server: tuple[str, EngineLoop],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The cache as of the subscription goes out as a snapshot of at most SNAPSHOT_HASHES_PER_LINE hashes and `stored`
    lines of as many (one line of a million hashes held the instance's event loop, then the proxy's, for seconds);
    the proxy's feed rebuilds the whole set from them, and the live events go on from the next seq."""
    monkeypatch.setattr(kv_events, "SNAPSHOT_HASHES_PER_LINE", 2, raising=False)
    url, loop = server
    _complete(url, list(range(400, 490)))  # 90 tokens + 2: 5 full blocks of 16 cached
    manager = loop.engine.block_manager
    wait_for(lambda: len(manager.events.cached_counts()) >= 5, "the prompt's blocks to be cached", 30)
    truth = {hash_hex(h) for h in manager.events.cached_counts()}  # the engine is idle: its whole cache
    with httpx.stream("GET", f"{url}/v1/kv_events", headers=internal_headers(SECRET), timeout=60) as stream:
        lines = (line for line in stream.iter_lines() if line)
        cached = CachedBlocks()
        snapshot = KV_EVENT.validate_json(next(lines))
        assert isinstance(snapshot, KvSnapshot) and len(snapshot.hashes) == 2
        assert cached.apply(snapshot) is None
        while cached.hashes != truth:
            event = KV_EVENT.validate_json(next(lines))
            assert isinstance(event, KvStored) and 1 <= len(event.hashes) <= 2, event
            assert cached.apply(event) is None  # seq 1, 2, ...: no gap
        assert cached.seq == (len(truth) - 1) // 2
        prompt = list(range(230, 270))  # new blocks: the live events follow the opening lines' seq
        _complete(url, prompt)
        while not set(prompt_block_hashes(prompt, BLOCK_SIZE)) <= cached.hashes:
            assert cached.apply(KV_EVENT.validate_json(next(lines))) is None
    assert cached.hashes == {hash_hex(h) for h in manager.events.cached_counts()}


def test_the_opening_lines_name_the_whole_cache_in_bounded_lines() -> None:
    cached = list(range(1, 10_001))
    events = list(kv_events.snapshot_lines("e", BLOCK_SIZE, 20_000, cached))
    assert [e.seq for e in events] == [0, 1, 2] and [len(e.hashes) for e in events] == [4096, 4096, 1808]
    assert isinstance(events[0], KvSnapshot) and events[0].num_blocks == 20_000
    assert all(isinstance(e, KvStored) for e in events[1:])
    assert max(len(e.model_dump_json()) for e in events) < 4096 * 35 + 200
    rebuilt = CachedBlocks()
    assert all(rebuilt.apply(e) is None for e in events)
    assert rebuilt.hashes == {hash_hex(h) for h in cached}
    empty = list(kv_events.snapshot_lines("e", BLOCK_SIZE, 8, []))
    assert len(empty) == 1 and isinstance(empty[0], KvSnapshot) and empty[0].hashes == []
