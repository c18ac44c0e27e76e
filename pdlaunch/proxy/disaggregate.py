"""Per-request disaggregation: a prompt with fewer than proxy.disaggregate_min_tokens uncached tokens runs
on a decode alone.

A short prompt's prefill costs the decode little, while the PD path adds a prefill leg, a KV transfer
and a handshake to its first token. The proxy tokenizes the prompt with the checkpoint's own tokenizer
(the one the instances use: the same chat template, the same special tokens; PromptTokens: by pieces kept
across requests, prompt_pieces.py, and off the event loop unless what is left to encode is short), and counts
the tokens the chosen decode does not cache already: its KV cache events say which of the prompt's leading
blocks it holds (kv_events.py, prefix.py; without them, every token counts).
A prompt with fewer than N such tokens goes to the decode without kv_transfer_params: the decode
computes what it lacks itself (as with kv_transfer.load_failure_policy recompute), and no KV moves. A PD request whose
prefill leg can run nowhere goes the same way under that policy (prefill_leg.py).

With proxy.disaggregate_max_queue_tokens Q, a prompt that would go PD is spilled to its decode too
while every ready prefill instance has at least Q uncached prompt tokens queued (prefill legs sent, not
answered: prefix.queued) and that decode has fewer than Q tokens of spilled prompts in flight (both counted over
every proxy worker: load_board.py). A
burst of long prompts then waits on one prefill GPU no longer than Q tokens of prefill work: the decode GPU
takes its share, as a colocated instance computes its own prompts, and the cap keeps its running streams from
paying for more than about Q tokens of prompts at a time. This is Dynamo's conditional disaggregation by
prefill queue size, counted in tokens.

With proxy.disaggregate_max_itl_ms T, a prompt that would run on its decode alone (short, or spilled) goes PD
instead while that decode's streams wait T ms or more per token (the mean over its last second, as its /health last
said, polled every second): prompt work on a decode lengthens every running stream's next token, and a decode
already at the TPOT target has no room for it. Decision `pd_decode_busy`. A decode whose last /health said it
streamed nothing while the proxy has requests in flight on it counts as busy too: that reading predates them (at the
start of a burst the proxy would otherwise spill onto a decode about to be full; measured on 2x H100, every request
over the tight TPOT target was one of the first ten, RESULTS.md forty-sixth session). With T set, the spill cap Q is
also a hard bound: a prompt spills only while the decode's spilled prompts in flight and this one together hold at
most Q tokens (without T: while they hold fewer than Q before it). The TPOT rule reacts to what the decode's streams
already wait; a spilled prompt's whole prefill lands on them before the next /health can say so (measured on 2x H100
at 24 req/s, RESULTS.md forty-seventh session: the requests over the tight TPOT target were those streaming when the
burst's first two 3072-token prompts spilled together under Q 4096).
A decode whose /health reports no itl_ms (not a pdlaunch instance) is never held to be busy.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import cast

from jinja2 import TemplateError

from pdlaunch.config.model_info import load_model_info
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.errors import OpenAIError
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.bodies import Body
from pdlaunch.proxy.instances import Instance
from pdlaunch.proxy.load_board import SPILLED_TOKENS
from pdlaunch.proxy.prompt_pieces import PieceTokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import ChatPrompt, render
from pdlaunch.server.completion_request import CompletionRequest
from pdlaunch.server.prompts import INLINE_CHAT_MESSAGES, Prompt, check_prompt_size, tokenize, tokenizes_inline

PD, DECODE_ONLY, SPILLED, DECODE_BUSY = "pd", "decode_only", "spilled", "pd_decode_busy"
ON_DECODE = (DECODE_ONLY, SPILLED)  # the decisions that run a request on its decode alone


class PromptTokens:
    """A request's prompt token ids as an instance computes them (a 400 for a prompt it would refuse). The text is
    encoded by pieces kept across requests (prompt_pieces.py): a conversation's turn encodes its new messages only.
    A prompt is tokenized on the event loop when what it leaves to encode is short, as an instance tokenizes one
    (server/prompts.py: a worker thread's hand-over and return cost more); a longer one, or a chat of many messages,
    in a worker thread, while the event loop relays the other requests (Tokenizer.encode releases the GIL).
    A prompt that no instance of the checkpoint takes by its size is not tokenized at all (`ids` None): the instance
    refuses it with its 400 before tokenizing (server/prompts.check_prompt_size), at any max_model_len up to the
    checkpoint's max_position_embeddings (the engine refuses a longer one), while the proxy's encode of it held a
    worker thread and a core as long as the instance's would have (86 s for 9M characters), for ids no answer
    needs: the request goes where the pool's policy sends it, and its instance answers the 400."""

    def __init__(self, tokenizer_dir: Path, chat_template: str | None = None) -> None:
        self._tokenizer = Tokenizer(tokenizer_dir)
        if chat_template is not None:  # the deployment's own (model.chat_template), as its instances apply it
            self._tokenizer.override_chat_template(chat_template)
        self._pieces = PieceTokenizer(self._tokenizer)
        info, _ = load_model_info(str(tokenizer_dir))
        # The most max_model_len an instance of this checkpoint may have; None (unreadable): every prompt is tokenized
        self.max_positions = info.max_position_embeddings if info is not None else None

    def ids_now(self, body: Body, chat: bool) -> list[int]:
        return tokenize(self._pieces, self._prompt(body, chat))

    @staticmethod
    def _prompt(body: Body, chat: bool) -> Prompt:
        if chat:
            return ChatCompletionRequest.model_validate(body).template_messages()
        return CompletionRequest.model_validate(body).single_prompt()

    def ids_unless_too_long(self, body: Body, chat: bool) -> list[int] | None:
        """`ids_now`, or None for a prompt no instance takes by its size (class doc)."""
        validated = self._prompt(body, chat)
        return None if self._too_long(validated) else tokenize(self._pieces, validated)

    def _too_long(self, prompt: Prompt) -> bool:
        """Whether every instance of the checkpoint refuses `prompt` by its size, untokenized (class doc)."""
        if self.max_positions is None or isinstance(prompt, list):  # token ids: nothing to encode
            return False
        try:
            check_prompt_size(prompt, self.max_positions)
        except OpenAIError:
            return True
        return False

    async def ids(self, body: Body, chat: bool) -> list[int] | None:
        """`ids_now`, off the event loop unless the prompt is token ids or quick to encode; None for a prompt no
        instance takes by its size (class doc)."""
        prompt = body.get("prompt")
        if not chat and isinstance(prompt, list) and all(type(t) is int for t in prompt):  # JSON's ints: no bools
            return cast(list[int], list(prompt))
        if not _validated_inline(body, chat):
            return await asyncio.to_thread(self.ids_unless_too_long, body, chat)
        validated = self._prompt(body, chat)
        if self._too_long(validated):
            return None
        if isinstance(validated, list) or self._encodes_inline(validated):
            return tokenize(self._pieces, validated)
        return await asyncio.to_thread(tokenize, self._pieces, validated)

    def _encodes_inline(self, prompt: str | ChatPrompt) -> bool:
        if isinstance(prompt, str):
            return tokenizes_inline([prompt], self._pieces.uncached_chars(prompt, True))
        if len(prompt.messages) > INLINE_CHAT_MESSAGES:
            return False
        try:
            text = render(self._tokenizer, prompt)
        except (OpenAIError, PdlaunchError, TemplateError):  # tokenize answers it, here: a 400 is quick
            return True
        return tokenizes_inline([prompt], self._pieces.uncached_chars(text, prompt.add_special_tokens))


def _validated_inline(body: Body, chat: bool) -> bool:
    """Whether the body is small enough to validate on the event loop: a chat of at most INLINE_CHAT_MESSAGES
    messages (content parts counted as messages), or one text prompt (validating it costs little whatever its size;
    the chat's cost goes with its messages' count)."""
    if not chat:
        return isinstance(body.get("prompt"), str)
    messages = body.get("messages")
    if not isinstance(messages, list):
        return True  # a 400 (validation refuses it at once)
    contents = [m.get("content") for m in messages if isinstance(m, dict)]
    parts = sum(len(content) for content in contents if isinstance(content, list))
    return len(messages) + parts <= INLINE_CHAT_MESSAGES


def spilled_on(decode: Instance) -> int:
    """Uncached prompt tokens of the requests spilled onto `decode` and in flight, every proxy worker's."""
    return decode.total(SPILLED_TOKENS)


class Disaggregation:
    """Decides, per request, PD or decode only; `min_tokens` None: always PD (no tokenizer needed).
    `max_queue_tokens`: spill PD prompts to the decode while the prefill queue is that full; `max_itl_ms`:
    no prompt on a decode whose streams wait that long per token (module doc)."""

    def __init__(self, min_tokens: int | None, tokenizer_dir: Path | None,
                 max_queue_tokens: int | None = None, max_itl_ms: float | None = None,
                 chat_template: str | None = None) -> None:
        if min_tokens is not None and (min_tokens < 1 or tokenizer_dir is None):
            raise ValueError("disaggregate_min_tokens needs a positive count and the checkpoint's tokenizer")
        if max_queue_tokens is not None and (min_tokens is None or max_queue_tokens < 1):
            raise ValueError("disaggregate_max_queue_tokens needs a positive count and "
                             "disaggregate_min_tokens")
        if max_itl_ms is not None and (min_tokens is None or not 0 < max_itl_ms < float("inf")):
            raise ValueError("disaggregate_max_itl_ms needs a positive number of milliseconds and "
                             "disaggregate_min_tokens")
        self.min_tokens, self.max_queue_tokens = min_tokens, max_queue_tokens
        self.max_itl_ms = max_itl_ms
        self.tokens = PromptTokens(tokenizer_dir, chat_template) if min_tokens is not None and tokenizer_dir else None

    def prompt_tokens(self, body: Body, chat: bool) -> int:
        """The prompt's token count as an instance computes it (a 400 for a prompt it would refuse)."""
        if self.tokens is None:
            raise ValueError("no tokenizer: disaggregate_min_tokens is not set")
        return len(self.tokens.ids_now(body, chat))

    def decision(self, uncached_tokens: int, prefill_queued: int = 0, decode: Instance | None = None,
                 decode_itl_ms: float | None = None, decode_in_flight: int = 0) -> str:
        """PD, DECODE_ONLY, SPILLED or DECODE_BUSY for a prompt of which the decode (`decode`, its streams
        waiting `decode_itl_ms` per token, `decode_in_flight` requests of every proxy worker on it) lacks
        `uncached_tokens`, while the least-queued ready prefill has `prefill_queued` tokens queued."""
        if self.min_tokens is None:
            return PD
        cap = self.max_queue_tokens
        if uncached_tokens < self.min_tokens:
            on_decode = DECODE_ONLY
        elif cap is not None and prefill_queued >= cap and self._room_to_spill(decode, uncached_tokens, cap):
            on_decode = SPILLED
        else:
            return PD
        if self.max_itl_ms is not None and decode_itl_ms is not None and (
                decode_itl_ms >= self.max_itl_ms or (decode_itl_ms == 0.0 and decode_in_flight > 0)):
            return DECODE_BUSY
        return on_decode

    def _room_to_spill(self, decode: Instance | None, tokens: int, cap: int) -> bool:
        """Whether `decode` may take a spilled prompt of `tokens`: fewer than `cap` spilled tokens in flight on it;
        with max_itl_ms, those and this prompt's together no more than `cap` (module doc)."""
        spilled = spilled_on(decode) if decode is not None else 0
        return spilled + tokens <= cap if self.max_itl_ms is not None else spilled < cap

    def spill(self, decode: Instance, tokens: int) -> Callable[[], None]:
        """Count `tokens` spilled onto `decode` until the returned callable runs (once; later calls do nothing)."""
        return decode.held_count(SPILLED_TOKENS, tokens)

    async def decide(self, body: Body, chat: bool) -> tuple[str, int | None]:
        """(PD or DECODE_ONLY, the prompt's tokens when counted: not without a tokenizer or for a prompt too long for
        any instance), every prompt token counted as uncached."""
        if self.tokens is None:
            return PD, None
        ids = await self.tokens.ids(body, chat)
        if ids is None:  # too long for any instance: its 400 answers the request
            return PD, None
        return self.decision(len(ids)), len(ids)
