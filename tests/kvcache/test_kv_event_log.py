"""KV cache events from the block manager: what enters and leaves the prefix cache reaches subscribers
(in order, named as `prompt_block_hashes` names a prompt's blocks); a slow subscriber is dropped."""

from __future__ import annotations

import asyncio
import threading

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.kvcache.event_log import KvEventLog, Run
from pdlaunch.kvcache.events import hash_hex, prompt_block_hashes

BS = 4


def _run_prompt(bm: BlockManager, rid: str, tokens: list[int]) -> None:
    hit = bm.match_prefix(tokens, len(tokens) - 1)
    assert bm.allocate(rid, len(tokens), hit.num_tokens, hit)
    bm.cache_blocks(rid, tokens, len(tokens))


def _hex(runs: list[Run]) -> list[tuple[str, list[str]]]:
    return [(kind, [hash_hex(h) for h in hashes]) for kind, hashes in runs]


def _cached_hex(log: KvEventLog) -> set[str]:
    return {hash_hex(h) for h in log.cached_counts()}


async def _drain(log: KvEventLog, subscriber: object) -> list[Run]:
    runs = await log.next_runs(subscriber, 0.01)  # type: ignore[arg-type]
    assert runs is not None
    return runs


def test_stored_then_removed_when_blocks_are_reused() -> None:
    async def main() -> None:
        bm = BlockManager(6, BS)
        subscriber, cached = bm.events.subscribe(asyncio.get_running_loop())
        assert cached == []
        prompt = list(range(100, 110))  # 10 tokens: two full blocks
        _run_prompt(bm, "a", prompt)
        assert _hex(await _drain(bm.events, subscriber)) == [("stored", prompt_block_hashes(prompt, BS))]
        bm.free("a")
        bm.check_integrity()
        _run_prompt(bm, "b", prompt + [7])  # a hit: its cached blocks are taken, nothing new is full
        assert await _drain(bm.events, subscriber) == []
        bm.free("b")
        other = list(range(200, 224))  # 6 blocks: every block, so both cached ones are reused
        assert bm.allocate("c", len(other), 0)
        removed = _hex(await _drain(bm.events, subscriber))
        assert removed == [("removed", list(reversed(prompt_block_hashes(prompt, BS))))]  # tail freed first
        bm.cache_blocks("c", other, len(other))
        assert _hex(await _drain(bm.events, subscriber)) == [("stored", prompt_block_hashes(other, BS))]
        assert _cached_hex(bm.events) == set(prompt_block_hashes(other, BS))
        bm.check_integrity()  # also: the event log's set equals what the group caches
        bm.free("c")
        bm.reset_prefix_cache()
        runs = await _drain(bm.events, subscriber)
        assert [k for k, _ in runs] == ["removed"] and set(_hex(runs)[0][1]) == set(prompt_block_hashes(other, BS))
        assert bm.events.cached_counts() == {}
        bm.check_integrity()

    asyncio.run(main())


def test_a_late_subscriber_gets_the_cache_as_snapshot() -> None:
    async def main() -> None:
        bm = BlockManager(8, BS)
        prompt = list(range(9))
        _run_prompt(bm, "a", prompt)
        _, cached = bm.events.subscribe(asyncio.get_running_loop())
        assert [hash_hex(h) for h in cached] == prompt_block_hashes(prompt, BS)

    asyncio.run(main())


def test_sliding_window_groups_do_not_repeat_events() -> None:
    async def main() -> None:
        bm = BlockManager(16, BS, sliding_windows=[8, None])  # the full-attention group is the second
        assert bm.event_group == 1
        subscriber, _ = bm.events.subscribe(asyncio.get_running_loop())
        prompt = list(range(30, 47))
        _run_prompt(bm, "a", prompt)
        assert _hex(await _drain(bm.events, subscriber)) == [("stored", prompt_block_hashes(prompt, BS))]
        bm.check_integrity()

    asyncio.run(main())


def test_prefix_caching_off_sends_nothing() -> None:
    bm = BlockManager(8, BS, enable_prefix_caching=False)
    _run_prompt(bm, "a", list(range(9)))
    assert bm.events.cached_counts() == {}


def test_a_subscriber_that_falls_behind_is_dropped_and_others_go_on() -> None:
    async def main() -> None:
        log = KvEventLog(max_queued_hashes=3)
        loop = asyncio.get_running_loop()
        slow, _ = log.subscribe(loop)
        fast, _ = log.subscribe(loop)
        for h in (1, 2):
            log.stored(h)
        log.flush()
        assert await log.next_runs(fast, 1.0) == [("stored", [1, 2])]
        log.removed(1)
        log.stored(3)
        log.flush()  # slow now has 4 queued hashes > 3: dropped
        assert await log.next_runs(slow, 1.0) is None
        assert await log.next_runs(fast, 1.0) == [("removed", [1]), ("stored", [3])]
        assert log.num_subscribers == 1
        assert log.cached_counts() == {2: 1, 3: 1}
        log.close()
        assert await log.next_runs(fast, 1.0) is None

    asyncio.run(main())


def test_events_from_another_thread_arrive_in_order() -> None:
    async def main() -> None:
        log = KvEventLog()
        subscriber, _ = log.subscribe(asyncio.get_running_loop())

        def engine() -> None:  # as the engine thread: note, flush, never wait for the reader
            for h in range(200):
                log.stored(h)
                if h % 3 == 0:
                    log.removed(h)
                log.flush()

        thread = threading.Thread(target=engine)
        thread.start()
        seen: list[Run] = []
        while sum(len(hashes) for _, hashes in seen) < 200 + 67:
            runs = await log.next_runs(subscriber, 10.0)
            assert runs is not None and (runs or thread.is_alive())
            seen += runs
        thread.join(10)
        flat = [(kind, h) for kind, hashes in seen for h in hashes]
        expected = [e for h in range(200) for e in ([("stored", h)] + ([("removed", h)] if h % 3 == 0 else []))]
        assert flat == expected
        assert set(log.cached_counts()) == {h for h in range(200) if h % 3}

    asyncio.run(main())
