"""Per-request disaggregation: a prompt with fewer than proxy.disaggregate_min_tokens uncached tokens runs
on a decode alone.

A short prompt's prefill costs the decode little, while the PD path adds a prefill leg, a KV transfer
and a handshake to its first token. The proxy tokenizes the prompt with the checkpoint's own tokenizer
(the one the instances use: the same chat template, the same special tokens; PromptTokens), off the
event loop, and counts the tokens the chosen decode does not cache already: its KV cache events say
which of the prompt's leading blocks it holds (kv_events.py, prefix.py; without them, every token counts).
A prompt with fewer than N such tokens goes to the decode without kv_transfer_params: the decode
computes what it lacks itself (as with kv_transfer.load_failure_policy recompute), and no KV moves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.bodies import Body
from pdlaunch.server.prompts import Prompt, tokenize
from pdlaunch.server.protocol import ChatCompletionRequest, CompletionRequest

PD, DECODE_ONLY = "pd", "decode_only"


class PromptTokens:
    """A request's prompt token ids as an instance computes them (a 400 for a prompt it would refuse)."""

    def __init__(self, tokenizer_dir: Path) -> None:
        self._tokenizer = Tokenizer(tokenizer_dir)

    def ids_now(self, body: Body, chat: bool) -> list[int]:
        prompt: Prompt
        if chat:
            prompt = ChatCompletionRequest.model_validate(body).template_messages()
        else:
            prompt = CompletionRequest.model_validate(body).single_prompt()
        return tokenize(self._tokenizer, prompt)

    async def ids(self, body: Body, chat: bool) -> list[int]:
        """`ids_now`, off the event loop unless the prompt is token ids already."""
        prompt = body.get("prompt")
        ids = [t for t in prompt if isinstance(t, int) and not isinstance(t, bool)] if isinstance(prompt, list) else []
        if not chat and isinstance(prompt, list) and len(ids) == len(prompt):
            return ids
        return await asyncio.to_thread(self.ids_now, body, chat)


class Disaggregation:
    """Decides, per request, PD or decode only; `min_tokens` None: always PD (no tokenizer needed)."""

    def __init__(self, min_tokens: int | None, tokenizer_dir: Path | None) -> None:
        if min_tokens is not None and (min_tokens < 1 or tokenizer_dir is None):
            raise ValueError("disaggregate_min_tokens needs a positive count and the checkpoint's tokenizer")
        self.min_tokens = min_tokens
        self.tokens = PromptTokens(tokenizer_dir) if min_tokens is not None and tokenizer_dir else None

    def prompt_tokens(self, body: Body, chat: bool) -> int:
        """The prompt's token count as an instance computes it (a 400 for a prompt it would refuse)."""
        if self.tokens is None:
            raise ValueError("no tokenizer: disaggregate_min_tokens is not set")
        return len(self.tokens.ids_now(body, chat))

    def decision(self, uncached_tokens: int) -> str:
        """PD or DECODE_ONLY for a prompt of which the decode lacks `uncached_tokens`."""
        return DECODE_ONLY if self.min_tokens is not None and uncached_tokens < self.min_tokens else PD

    async def decide(self, body: Body, chat: bool) -> tuple[str, int | None]:
        """(PD or DECODE_ONLY, the prompt's tokens when counted), every prompt token counted as uncached."""
        if self.tokens is None:
            return PD, None
        count = len(await self.tokens.ids(body, chat))
        return self.decision(count), count
