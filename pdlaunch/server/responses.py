"""OpenAI response bodies built from engine outputs: whole responses and streamed chunks."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pdlaunch.engine.outputs import RequestOutput, TokenLogprob
from pdlaunch.server.protocol import Endpoint
from pdlaunch.server.tool_calls import ToolCalling, ToolStream

Detokenize = Callable[[int], str]


@dataclass
class ResponseBuilder:
    """Accumulates one request's outputs and renders OpenAI JSON for completions or chat."""

    endpoint: Endpoint
    response_id: str
    model: str
    detokenize: Detokenize
    num_prompt_tokens: int = 0
    return_token_ids: bool = False
    prompt_token_ids: list[int] | None = None  # with return_token_ids: sent once, in the first chunk (vLLM's)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    num_output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    finish_reason: str | None = None
    kv_transfer_params: dict[str, Any] | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # vLLM's prompt_logprobs (first entry None)
    echo_logprobs: bool = False  # `logprobs` starts with the echoed prompt: its first token has none
    tool_calling: ToolCalling | None = None  # chat with tools (server/tool_calls.py)
    _text_offset: int = 0
    _sent_role: bool = False
    _tool_stream: ToolStream | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.output_token_ids = list(out.output_token_ids)
        self.num_output_tokens = len(out.output_token_ids)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.new_logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.kv_transfer_params = out.kv_transfer_params

    def usage(self) -> dict[str, Any]:
        return {
            "prompt_tokens": self.num_prompt_tokens,
            "completion_tokens": self.num_output_tokens,
            "total_tokens": self.num_prompt_tokens + self.num_output_tokens,
            "prompt_tokens_details": {"cached_tokens": self.num_cached_tokens},
        }

    # -- whole responses ---------------------------------------------------------------------------
    def response(self) -> dict[str, Any]:
        if self.endpoint == "completion":
            choice: dict[str, Any] = {
                "index": 0, "text": self.text, "finish_reason": self.finish_reason,
                "logprobs": self._completion_logprobs(self.logprobs, 0, self.echo_logprobs),
            }
            if self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(self.prompt_logprobs)
            obj = "text_completion"
        else:
            message: dict[str, Any] = {"role": "assistant", "content": self.text}
            finish_reason = self.finish_reason
            if self.tool_calling is not None:
                content, calls = self.tool_calling.parse(self.text)
                message = {"role": "assistant", "content": content, "tool_calls": calls}
                finish_reason = self._tool_finish_reason(bool(calls))
            choice = {
                "index": 0, "message": message,
                "finish_reason": finish_reason, "logprobs": self._chat_logprobs(self.logprobs),
            }
            obj = "chat.completion"
        if self.return_token_ids:
            choice["token_ids"] = self.output_token_ids
        body = {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [choice], "usage": self.usage()}
        self._add_prompt_token_ids(body, choice)
        if self.endpoint == "chat" and self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(self.prompt_logprobs)
        if self.kv_transfer_params is not None:
            body["kv_transfer_params"] = self.kv_transfer_params
        return body

    # -- streaming -----------------------------------------------------------------------------------
    def chunk(self, out: RequestOutput, final_usage: bool) -> dict[str, Any] | None:
        """The chunk for one step's output, or None when it carries nothing to send.

        `final_usage`: the chunk that finishes the request also carries `usage` (when the client
        did not ask for a separate usage chunk, so that every stream ends with its usage).
        """
        self.add(out)
        carries = (out.new_text or out.finished or out.new_logprobs or (self.return_token_ids and out.new_token_ids)
                   or (self.endpoint == "chat" and not self._sent_role))
        if not carries:
            return None  # e.g. a token that ends mid-character: its text comes with the next one
        finish = out.finish_reason if out.finished else None
        if self.endpoint == "completion":
            choice: dict[str, Any] = {
                "index": 0, "text": out.new_text, "finish_reason": finish,
                "logprobs": self._completion_logprobs(out.new_logprobs, self._text_offset),
            }
            obj = "text_completion"
        else:
            delta: dict[str, Any] = {"content": out.new_text}
            if self.tool_calling is not None:
                if self._tool_stream is None:
                    self._tool_stream = ToolStream(self.tool_calling)
                delta = self._tool_stream.delta(out.new_text, out.finished)
                if finish is not None:
                    finish = self._tool_finish_reason("tool_calls" in delta or self._tool_stream.opened)
                if not delta and finish is None and self._sent_role and not out.new_logprobs:
                    self._text_offset += len(out.new_text)
                    return None  # held back: a tool call may be starting
            if not self._sent_role:
                delta["role"] = "assistant"
                self._sent_role = True
            choice = {"index": 0, "delta": delta, "finish_reason": finish,
                      "logprobs": self._chat_logprobs(out.new_logprobs)}
            obj = "chat.completion.chunk"
        if self.return_token_ids:
            choice["token_ids"] = list(out.new_token_ids)
        self._text_offset += len(out.new_text)
        body: dict[str, Any] = {"id": self.response_id, "object": obj, "created": self.created,
                                "model": self.model, "choices": [choice]}
        self._add_prompt_token_ids(body, choice)
        if out.finished:
            if final_usage:
                body["usage"] = self.usage()
            if self.kv_transfer_params is not None:
                body["kv_transfer_params"] = self.kv_transfer_params
        return body

    def _add_prompt_token_ids(self, body: dict[str, Any], choice: dict[str, Any]) -> None:
        """vLLM's places: in the completion choice, at the top of a chat body; once per stream (the proxy
        continues a migrated stream from them: proxy/migrate.py)."""
        if not self.return_token_ids or self.prompt_token_ids is None:
            return
        (choice if self.endpoint == "completion" else body)["prompt_token_ids"] = self.prompt_token_ids
        self.prompt_token_ids = None

    def _tool_finish_reason(self, called: bool) -> str | None:
        """vLLM's: "tool_calls" when auto or required called tools; a named call stays "stop"."""
        if called and self.finish_reason == "stop" and self.tool_calling is not None \
                and self.tool_calling.mode != "named":
            return "tool_calls"
        return self.finish_reason

    def usage_chunk(self) -> dict[str, Any]:
        obj = "text_completion" if self.endpoint == "completion" else "chat.completion.chunk"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    # -- logprobs ------------------------------------------------------------------------------------
    def _completion_logprobs(self, items: list[TokenLogprob] | None, offset: int,
                             first_has_none: bool = False) -> dict[str, Any] | None:
        """`first_has_none`: the first item is an echoed prompt's first token, which nothing predicts."""
        if items is None:
            return None
        tokens = [self.detokenize(lp.token_id) for lp in items]
        offsets = []
        for tok in tokens:
            offsets.append(offset)
            offset += len(tok)
        token_logprobs: list[float | None] = [lp.logprob for lp in items]
        top: list[dict[str, float] | None] = [{self.detokenize(t): v for t, v in lp.top.items()} for lp in items]
        if first_has_none and items:
            token_logprobs[0] = top[0] = None
        return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}

    def _vllm_prompt_logprobs(self, items: list[TokenLogprob | None]) -> list[dict[str, Any] | None]:
        """vLLM's shape: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}},
        the prompt's token first, then the top alternatives (ranked 1..k)."""
        def entry(token_id: int, logprob: float, rank: int | None) -> dict[str, Any]:
            return {"logprob": logprob, "rank": rank, "decoded_token": self.detokenize(token_id)}

        out: list[dict[str, Any] | None] = []
        for lp in items:
            if lp is None:
                out.append(None)
                continue
            ranked = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
            for rank, (token_id, value) in enumerate(lp.top.items(), start=1):
                ranked.setdefault(str(token_id), entry(token_id, value, rank))
            out.append(ranked)
        return out

    def _chat_logprobs(self, items: list[TokenLogprob] | None) -> dict[str, Any] | None:
        if items is None:
            return None

        def entry(token_id: int, logprob: float) -> dict[str, Any]:
            token = self.detokenize(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
            for lp in items
        ]}
