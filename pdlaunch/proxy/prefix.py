"""Prefix-aware routing (proxy.routing_policy prefix): a prompt goes to the instance that caches the longest
prefix of it, weighed against the work queued there; a prefill leg and a decode leg alike.

For every ready instance i of the role:

    score(i) = matched_tokens(i) - ALPHA * queued_tokens(i)

- matched_tokens(i): tokens of the prompt's leading full blocks that i caches and would take from its cache:
  the prompt's chained block hashes (kvcache/events.prompt_block_hashes over the token ids the proxy
  tokenized) against i's set from its KV cache events (kv_events.py); 0 while that set is unknown. Only the
  blocks before the prompt's last token count: an instance computes that token whatever it caches (its logits
  are the first output token; engine/scheduler_admission.py looks up num_tokens - 1), so a prompt whose every
  block is cached still costs i the last block, and counts that block as queued work there. A request for
  prompt logprobs (prompt_logprobs, or echo with logprobs) matches nothing: an instance computes every
  position of such a prompt for its logits, taking nothing from its cache, so all its tokens count as queued
  (a PD decode leg, which loads the prompt without its logprobs, is counted so too: its count also decides
  whether the decode computes the prompt alone, logprobs and all).
- queued_tokens(i): uncached prompt tokens of the legs this proxy has in flight on i (a prefill leg until it
  answers, a decode leg until its answer ends), every proxy worker's (load_board.py).
- ALPHA = 1: a token queued ahead of ours costs i about what a token of our prompt that it must compute
  does, so i's time to our first token goes with queued(i) + (prompt - matched(i)), which the highest score
  minimises. A hot prefix thus stays on one instance only while the work piled up there is less than what
  its cached prefix saves; then the next instance takes it (and caches it too).

The highest score wins; equal scores (no instance caches any of the prompt, say) go to the fewest legs in
flight, then round robin (instances.LeastLoaded), as do retries and fallbacks. Under the other policies the
pool's own choice stands and the chosen instance's match is still counted: per-request disaggregation
(disaggregate.py) counts the tokens the chosen decode lacks.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from pdlaunch.kvcache.events import PromptBlockHashes
from pdlaunch.proxy.bodies import Body, several_prompts
from pdlaunch.proxy.disaggregate import PromptTokens
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.kv_events import KvEventFeed
from pdlaunch.proxy.load_board import QUEUED_TOKENS

ALPHA = 1.0  # weight of a queued prompt token against a matched one (module doc)
_ID_BOUND = 1 << 63  # block hashes pack token ids as int64 (kvcache/prefix_cache.hash_block)


@dataclass
class PromptBlocks:
    """A prompt's token ids and, per block size, the chained hashes of the blocks an instance may take from its
    prefix cache (each hashed once, and only as far as some instance's match reads): the full blocks before the
    last token, which an instance always computes."""

    token_ids: list[int]
    reuses_cache: bool = True  # False: the request wants prompt logprobs, so an instance computes every token
    _hashes: dict[int, PromptBlockHashes] = field(default_factory=dict)

    def matched_blocks(self, block_size: int, cached: set[str] | frozenset[str]) -> int:
        """How many of those blocks, from the first, are in `cached`."""
        if not self.reuses_cache:
            return 0
        if block_size not in self._hashes:
            self._hashes[block_size] = PromptBlockHashes(self.token_ids[:-1], block_size)
        return self._hashes[block_size].matched(cached)


@dataclass(frozen=True)
class Choice:
    instance: Instance
    matched_tokens: int  # prompt tokens the instance caches (0: none, or its events are unknown)
    by_prefix: bool = False  # picked for its cached prefix: it caches more of the prompt than another candidate


class PrefixRouter:
    """Chooses instances by cached prefix (`by_prefix`: the prefix policy) and counts what each caches
    of a prompt; `feed` None: no instance's cache is known (every match is 0)."""

    def __init__(self, pool: InstancePool, feed: KvEventFeed | None, tokens: PromptTokens | None,
                 by_prefix: bool, alpha: float = ALPHA) -> None:
        if by_prefix and (feed is None or tokens is None):
            raise ValueError("prefix routing needs the instances' KV cache events and the checkpoint's tokenizer")
        self.pool, self.feed, self.tokens, self.by_prefix, self.alpha = pool, feed, tokens, by_prefix, alpha

    async def prompt(self, body: Body, chat: bool) -> PromptBlocks | None:
        """The request's prompt as token ids, when there is a tokenizer to count them and one prompt to count
        (else None: a list of prompts sent colocated as one request goes where the pool's policy says; so does a
        prompt too long for any instance, which its 400 answers: disaggregate.PromptTokens)."""
        if self.tokens is None or (not chat and several_prompts(body.get("prompt"))):
            return None
        ids = await self.tokens.ids(body, chat)
        if ids is None:
            return None
        # A client's own token ids may be no model's (the instance answers the 400): unhashable. A tokenizer's are.
        if isinstance(body.get("prompt"), list) and ids and (min(ids) < 0 or max(ids) >= _ID_BOUND):
            return None
        return PromptBlocks(ids, reuses_cache=not wants_prompt_logprobs(body, chat))

    def matched_tokens(self, instance: Instance, prompt: PromptBlocks | None) -> int:
        cached = self.feed.usable(instance) if self.feed is not None and prompt is not None else None
        if cached is None or prompt is None:
            return 0
        return prompt.matched_blocks(cached.block_size, cached.hashes) * cached.block_size

    def choose(self, role: str, prompt: PromptBlocks | None) -> Choice:
        """A ready instance of `role` for `prompt` (a 503 when there is none, as InstancePool.pick)."""
        if not self.by_prefix or prompt is None:
            instance = self.pool.pick(role)
            return Choice(instance, self.matched_tokens(instance, prompt))
        ready = [i for i in self.pool.instances if i.role == role and i.state == "ready"]
        if not ready:
            self.pool.pick(role)  # raises the 503 naming every instance's state
        matched = {i.name: self.matched_tokens(i, prompt) for i in ready}
        scores = {i.name: matched[i.name] - self.alpha * queued(i) for i in ready}
        best = max(scores.values())
        tied = [i for i in ready if scores[i.name] == best]
        instance = tied[0] if len(tied) == 1 else self.pool.policy.choose(role, tied)
        return Choice(instance, matched[instance.name], by_prefix=matched[instance.name] > min(matched.values()))

    def least_queued(self, role: str) -> int:
        """The fewest tokens queued on a ready instance of `role` (0 when none is ready)."""
        ready = [queued(i) for i in self.pool.instances if i.role == role and i.state == "ready"]
        return min(ready, default=0)

    def enqueue(self, instance: Instance, tokens: int) -> Callable[[], None]:
        """Count `tokens` queued on `instance` until the returned callable runs (once; later calls do nothing)."""
        return instance.held_count(QUEUED_TOKENS, tokens)


def queued(instance: Instance) -> int:
    """Uncached prompt tokens of the legs in flight on `instance`, from every proxy worker (load_board.py)."""
    return instance.total(QUEUED_TOKENS)


def wants_prompt_logprobs(body: Body, chat: bool) -> bool:
    """Whether an instance serving `body` computes the prompt's logprobs, as the instances read the request
    (server/completion_request.py: prompt_logprobs, else echo's logprobs; a chat's prompt_logprobs). A stream asks
    for none: parse_client_body refuses either with stream true, as the instances do (server/request_fields.py)."""
    if body.get("prompt_logprobs") is not None:
        return True
    return not chat and bool(body.get("echo")) and body.get("logprobs") is not None
