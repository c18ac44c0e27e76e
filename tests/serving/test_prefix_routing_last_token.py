"""Prefix routing counts what an instance takes from its cache, not all it caches: an instance computes a
prompt's last token whatever it holds (engine/scheduler_admission.py looks up num_tokens - 1), so the block
holding that token is never a hit. Counting it made a prompt whose every block is cached cost its instance
nothing: identical prompts piled onto that instance without end, and disaggregation took 0 uncached tokens
for a prompt the decode must compute a block of. A request for prompt logprobs takes nothing from the cache.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from pdlaunch.kvcache.block_manager import BlockManager
from pdlaunch.kvcache.events import hash_hex
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.disaggregate import PromptTokens
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.kv_events import CachedBlocks, KvEventFeed
from pdlaunch.proxy.prefix import PrefixRouter, PromptBlocks

BS = 4


def _router(names: list[str]) -> tuple[PrefixRouter, KvEventFeed, list[Instance]]:
    instances = [Instance("prefill", f"http://127.0.0.1:{9 + i}", name, state="ready") for i, name in enumerate(names)]
    feed = KvEventFeed(instances, {})
    router = PrefixRouter(InstancePool(instances, "prefix"), feed, PromptTokens(resolve_model_path("tiny")),
                          by_prefix=True)
    return router, feed, instances


def _cached_after(prompts: list[list[int]]) -> tuple[BlockManager, CachedBlocks]:
    """An instance's block manager after serving `prompts` (one at a time), and the proxy's view of its cache."""
    bm = BlockManager(32, BS)
    for n, tokens in enumerate(prompts):
        hit = bm.match_prefix(tokens, len(tokens) - 1)  # as the scheduler admits a prompt
        assert bm.allocate(f"r{n}", len(tokens), hit.num_tokens, hit)
        bm.cache_blocks(f"r{n}", tokens, len(tokens))
        bm.free(f"r{n}")
    return bm, CachedBlocks({hash_hex(h) for h in bm.events.cached_counts()}, BS, "", 0)


@pytest.mark.parametrize("length", [1, 3, 4, 5, 8, 11, 12, 13])
def test_matched_tokens_are_what_the_instance_reuses(length: int) -> None:
    served = list(range(1000, 1016))  # 4 full blocks cached
    bm, cached = _cached_after([served])
    router, feed, instances = _router(["prefill-0"])
    feed.cached["prefill-0"] = cached
    prompt = served[:length]
    reused = bm.match_prefix(prompt, len(prompt) - 1).num_tokens
    assert router.matched_tokens(instances[0], PromptBlocks(prompt)) == reused


def test_an_identical_prompt_does_not_pile_onto_the_instance_that_caches_it() -> None:
    """12 tokens, all 3 blocks cached on prefill-0: it reuses 8 and computes 4 per request, so its queue grows
    by 4 per request in flight and the third goes to prefill-1 (score 8 - 4 * 2 = 0 ties, then 8 - 4 * 3 < 0)."""
    prompt = list(range(500, 512))
    _, cached = _cached_after([prompt])
    router, feed, _ = _router(["prefill-0", "prefill-1"])
    feed.cached["prefill-0"] = cached
    feed.cached["prefill-1"] = CachedBlocks(set(), BS, "", 0)
    blocks = PromptBlocks(prompt)
    chosen = []
    for _ in range(4):
        choice = router.choose("prefill", blocks)
        router.enqueue(choice.instance, len(prompt) - choice.matched_tokens)
        chosen.append((choice.instance.name, choice.matched_tokens))
    assert chosen[:2] == [("prefill-0", 8), ("prefill-0", 8)]
    assert ("prefill-1", 0) in chosen[2:]


@pytest.mark.parametrize(("body", "chat", "reuses"), [
    ({"prompt": "x"}, False, True),
    ({"prompt": "x", "prompt_logprobs": 0}, False, False),
    ({"prompt": "x", "echo": True, "logprobs": 1}, False, False),
    ({"prompt": "x", "echo": True}, False, True),
    ({"prompt": "x", "logprobs": 1}, False, True),
    ({"messages": [{"role": "user", "content": "x"}], "prompt_logprobs": 2}, True, False),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, True, True),
])
def test_a_prompt_whose_logprobs_are_asked_matches_nothing(body: dict[str, object], chat: bool,
                                                            reuses: bool) -> None:
    """An instance computes every position of a prompt whose logprobs it returns (no prefix hit): routing it by
    the prefix another request cached piled such requests (an evaluation's shared context) onto one instance,
    each counted as a few queued tokens while it computed the whole prompt."""
    served = list(range(1000, 1016))
    _, cached = _cached_after([served])
    router, feed, instances = _router(["prefill-0"])
    feed.cached["prefill-0"] = cached
    if not chat:
        body = {**body, "prompt": served}
    prompt = asyncio.run(router.prompt(body, chat))
    assert prompt is not None and len(prompt.token_ids) > BS
    if chat:  # the chat template's tokens: what the instance caches is the same prompt's blocks
        feed.cached["prefill-0"] = _cached_after([prompt.token_ids])[1]
    expected = (len(prompt.token_ids) - 1) // BS * BS if reuses else 0
    assert router.matched_tokens(instances[0], prompt) == expected


def test_a_long_prompt_is_hashed_only_as_far_as_an_instance_caches_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The router hashes a prompt's blocks on the event loop, and a chain's match stops at its first miss: hashing
    every block first held the proxy's event loop ~0.1 s for a 128K-token prompt (3 s for a 6.5M-token one the
    instance refuses by its length) even where no instance cached more than its first blocks."""
    from pdlaunch.kvcache import events

    hashed = [0]
    blake2b = events.hashlib.blake2b

    class Counting:
        @staticmethod
        def blake2b(data: bytes, digest_size: int) -> Any:
            hashed[0] += 1
            return blake2b(data, digest_size=digest_size)

    prompt = [7 + i % 400 for i in range(100_000)]  # 25,000 blocks of 4
    _, cached = _cached_after([prompt[:12]])  # its first 12 tokens served: their 3 blocks cached
    router, feed, instances = _router(["prefill-0"])
    feed.cached["prefill-0"] = cached
    monkeypatch.setattr(events, "hashlib", Counting)
    blocks = PromptBlocks(prompt)
    assert router.matched_tokens(instances[0], blocks) == 3 * BS
    assert router.matched_tokens(instances[0], blocks) == 3 * BS  # asked again (another instance): hashed once
    assert hashed[0] <= 128, f"{hashed[0]} blocks hashed to match 3"
    whole = PromptBlocks(prompt[:40])  # a prompt cached further reads further: still the whole chain's hashes
    feed.cached["prefill-0"] = CachedBlocks(set(events.prompt_block_hashes(prompt[:39], BS)), BS, "", 0)
    assert router.matched_tokens(instances[0], whole) == 36
