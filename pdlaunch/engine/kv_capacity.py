"""What an engine's KV cache can hold of one request, and the refusal of a request that needs more than all of it.

An engine refuses a request whose prompt + max_tokens needs more blocks than its whole KV cache has
(engine_requests.add_request): admitted, it would preempt itself forever. The numbers that decide it are this model:
a PD decode reports it in its /health (`kv_capacity`, server/status.py), the proxy passes the chosen decode's on the
prefill leg (`decode_limits.kv_cache`, proxy/translate.py), and the prefill refuses such a request with the decode's
own 400 before it computes the prompt (server/decode_limits.py). One model and one message for both sides, so the
prefill's refusal is the decode's, word for word.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pdlaunch.config.strict_model import MAX_TOKENS
from pdlaunch.engine.outputs import MAX_INT32
from pdlaunch.errors import EngineError

KV_SIZE_HINT = "shorten the request or give the KV cache more memory"  # the refusal's fix, as the engine adds it


class KVCapacity(BaseModel):
    """An engine's KV cache as a request's admission sees it. Also a message from another process (a decode's
    /health, a prefill leg's decode_limits): every value bounded, nothing else accepted."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    num_blocks: int = Field(gt=0, le=MAX_INT32, description="Blocks of each KV-cache group, in all.")
    block_size: int = Field(gt=0, le=MAX_TOKENS, description="Tokens per block.")
    window_blocks: int | None = Field(
        None, gt=0, le=MAX_INT32, description="Most blocks a request holds in a group whatever its length, when every "
        "group is sliding-window (its window and one step's prompt chunk); null with a full-attention group, where a "
        "request of n tokens holds all of its ceil(n / block_size) blocks.")

    def blocks_needed(self, num_tokens: int) -> int:
        """Most blocks a request of `num_tokens` (prompt and output) holds in one group at any step."""
        whole = -(-num_tokens // self.block_size)
        return whole if self.window_blocks is None else min(whole, self.window_blocks)

    def longest(self, max_model_len: int) -> int:
        """The most tokens one request may reach: max_model_len, or fewer when a full-attention group holds fewer
        (a request without an output limit asks for no more)."""
        held = self.num_blocks * self.block_size
        return min(max_model_len, held) if self.window_blocks is None else max_model_len

    def refusal(self, num_tokens: int) -> EngineError | None:
        """The engine's refusal of a request of `num_tokens` that needs more blocks than the cache has, or None."""
        need = self.blocks_needed(num_tokens)
        if need <= self.num_blocks:
            return None
        return EngineError(f"the request needs up to {need} KV blocks but the cache has {self.num_blocks}",
                           field="prompt", hint=KV_SIZE_HINT)


def window_blocks(windows: list[int | None], block_size: int, chunk: int) -> int | None:
    """KVCapacity.window_blocks of an engine whose KV-cache groups have these sliding windows (None: full attention)
    and whose steps take prompt chunks of at most `chunk` tokens: a sliding group keeps the window behind the chunk
    it computes, plus the partial block at each end."""
    if any(w is None for w in windows):
        return None
    return max(-(-(chunk + w) // block_size) + 1 for w in windows if w is not None)
