"""Per-request disaggregation: a prompt shorter than proxy.disaggregate_min_tokens runs on a decode alone.

A short prompt's prefill costs the decode little, while the PD path adds a prefill leg, a KV transfer
and a handshake to its first token. The proxy counts the prompt's tokens with the checkpoint's own
tokenizer (the one the instances use: the same chat template, the same special tokens), off the event
loop, and sends a prompt of fewer than N tokens to a decode without kv_transfer_params: the decode
computes the prompt itself (as with kv_transfer.load_failure_policy recompute), and no KV moves.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.bodies import Body
from pdlaunch.server.prompts import Prompt, tokenize
from pdlaunch.server.protocol import ChatCompletionRequest, CompletionRequest

PD, DECODE_ONLY = "pd", "decode_only"


class Disaggregation:
    """Decides, per request, PD or decode only; `min_tokens` None: always PD (no tokenizer needed)."""

    def __init__(self, min_tokens: int | None, tokenizer_dir: Path | None) -> None:
        if min_tokens is not None and (min_tokens < 1 or tokenizer_dir is None):
            raise ValueError("disaggregate_min_tokens needs a positive count and the checkpoint's tokenizer")
        self.min_tokens = min_tokens
        self._tokenizer = Tokenizer(tokenizer_dir) if min_tokens is not None and tokenizer_dir else None

    def prompt_tokens(self, body: Body, chat: bool) -> int:
        """The prompt's token count as an instance computes it (a 400 for a prompt it would refuse)."""
        prompt: Prompt
        if chat:
            prompt = ChatCompletionRequest.model_validate(body).template_messages()
        else:
            prompt = CompletionRequest.model_validate(body).single_prompt()
        return len(tokenize(self._tokenizer, prompt))

    async def decide(self, body: Body, chat: bool) -> tuple[str, int | None]:
        """(PD or DECODE_ONLY, the prompt's tokens when counted)."""
        if self.min_tokens is None or self._tokenizer is None:
            return PD, None
        prompt = body.get("prompt")
        if not chat and isinstance(prompt, list) and all(isinstance(t, int) for t in prompt):
            count = len(prompt)
        else:
            count = await asyncio.to_thread(self.prompt_tokens, body, chat)
        return (DECODE_ONLY if count < self.min_tokens else PD), count
