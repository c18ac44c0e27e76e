"""OpenAI response bodies built from engine outputs: whole responses and streamed chunks. Every choice carries
vLLM's `stop_reason` besides `finish_reason`: the stop_token_ids entry or stop string that ended it, else null."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from pdlaunch.engine.detokenizer import Decode
from pdlaunch.engine.outputs import RequestOutput, TokenLogprob
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.server.request_fields import Endpoint
from pdlaunch.server.text_offsets import TextOffsets
from pdlaunch.server.tool_calls import ToolCalling
from pdlaunch.server.tool_stream import ToolStream

Detokenize = Callable[[int], str]
# kv_transfer_params key of a decode's answer (and of its stream event with usage) whose remote prefill's KV was
# not loaded: it computed the prompt itself, so its cached_tokens are its own prefix-cache hits (proxy/translate.py).
PROMPT_RECOMPUTED = "prompt_recomputed"


@dataclass
class ResponseBuilder:
    """Accumulates one choice's outputs and renders OpenAI JSON for completions or chat."""

    endpoint: Endpoint
    response_id: str
    model: str
    detokenize: Detokenize  # one token's own text (a logprob's token)
    decode: Decode  # token ids' text, as the choice's text is decoded (text_offset counts in it)
    index: int = 0  # the choice's index in its request's streamed chunks
    num_prompt_tokens: int = 0
    return_token_ids: bool = False
    prompt_token_ids: list[int] | None = None  # with return_token_ids: sent once, in the first chunk (vLLM's)
    created: int = field(default_factory=lambda: int(time.time()))
    text: str = ""
    num_output_tokens: int = 0
    output_token_ids: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    prompt_recomputed: bool = False  # its remote prefill's KV was not loaded: the prompt was computed here
    finish_reason: str | None = None
    stop_reason: int | str | None = None  # vLLM's: the stop token id or stop string that ended it
    kv_transfer_params: JsonObject | None = None
    logprobs: list[TokenLogprob] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None  # vLLM's prompt_logprobs (first entry None)
    echo_logprobs: int = 0  # `logprobs` starts with this many tokens of the echoed prompt: the first has none
    prompt_ids: Sequence[int] = ()  # the output's decoding context; an echoed prompt's tokens
    echo_chars: int = 0  # characters of the echoed prompt before the output in the text
    echo_decode: Decode | None = None  # token ids' text as the echoed prompt's is decoded (choices.echoed)
    tool_calling: ToolCalling | None = None  # chat with tools (server/tool_calls.py)
    _stream_offsets: TextOffsets | None = None
    _sent_role: bool = False
    _tool_stream: ToolStream | None = None

    def add(self, out: RequestOutput) -> None:
        self.text += out.new_text
        self.output_token_ids = list(out.output_token_ids)
        self.num_output_tokens = len(out.output_token_ids)
        if out.num_prompt_tokens:
            self.num_prompt_tokens = out.num_prompt_tokens
        self.num_cached_tokens = out.num_cached_tokens
        self.prompt_recomputed = self.prompt_recomputed or out.prompt_recomputed
        if out.new_logprobs is not None:
            self.logprobs = (self.logprobs or []) + list(out.new_logprobs)
        if out.prompt_logprobs is not None:
            self.prompt_logprobs = out.prompt_logprobs
        if out.finished:
            self.finish_reason = out.finish_reason
            self.stop_reason = out.stop_reason
            self.kv_transfer_params = out.kv_transfer_params

    def usage(self) -> JsonObject:
        return usage_body(self.num_prompt_tokens, self.num_output_tokens, self.num_cached_tokens)

    # -- whole responses ---------------------------------------------------------------------------
    def choice(self, index: int) -> JsonObject:
        """This choice, numbered `index`, as a whole response lists it."""
        choice: JsonObject
        if self.endpoint == "completion":
            logprobs = self._completion_logprobs(self.logprobs, self._whole_offsets(), self.echo_logprobs > 0)
            choice = {"index": index, "text": self.text, "finish_reason": self.finish_reason,
                      "stop_reason": self.stop_reason, "logprobs": logprobs}
            if self.prompt_logprobs is not None:
                choice["prompt_logprobs"] = self._vllm_prompt_logprobs(self.prompt_logprobs)
            if self.return_token_ids and self.prompt_token_ids is not None:
                choice["prompt_token_ids"] = _json_list(self.prompt_token_ids)
        else:
            # vLLM's message always carries tool_calls (an empty list without tools)
            message: JsonObject = {"role": "assistant", "content": self.text, "tool_calls": []}
            finish_reason = self.finish_reason
            if self.tool_calling is not None:
                content, calls = self.tool_calling.parse(self.text)
                message = {"role": "assistant", "content": content, "tool_calls": _json_list(calls)}
                finish_reason = self._tool_finish_reason(bool(calls))
            choice = {"index": index, "message": message, "finish_reason": finish_reason,
                      "stop_reason": self.stop_reason, "logprobs": self._chat_logprobs(self.logprobs)}
        if self.return_token_ids:
            choice["token_ids"] = _json_list(self.output_token_ids)
        return choice

    def response(self, choices: list[JsonObject], usage: JsonObject) -> JsonObject:
        """The whole response around `choices`; what a chat body carries once (prompt token ids and
        logprobs) and the prefill's kv_transfer_params come from this, the first choice."""
        obj = "text_completion" if self.endpoint == "completion" else "chat.completion"
        # system_fingerprint: null as vLLM's whole answers carry it (its stream chunks have none)
        body: JsonObject = {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                            "choices": _json_list(choices), "system_fingerprint": None, "usage": usage}
        if self.endpoint == "chat" and self.return_token_ids and self.prompt_token_ids is not None:
            body["prompt_token_ids"] = _json_list(self.prompt_token_ids)
        if self.endpoint == "chat" and self.prompt_logprobs is not None:
            body["prompt_logprobs"] = self._vllm_prompt_logprobs(self.prompt_logprobs)
        if self.kv_transfer_params is not None:
            body["kv_transfer_params"] = self.kv_transfer_params
        return body

    # -- streaming -----------------------------------------------------------------------------------
    def chunks(self, out: RequestOutput) -> list[JsonObject]:
        """The chunks for one step's output: none when it carries nothing to send, two when it finishes the choice
        with tool calls (_finish_apart). Usage comes only in the usage chunk (usage_chunk), as vLLM's: a client that
        did not ask for it gets none."""
        self.add(out)
        carries = (out.new_text or out.finished or out.new_logprobs or (self.return_token_ids and out.new_token_ids)
                   or (self.endpoint == "chat" and not self._sent_role))
        if not carries:
            return []  # e.g. a token that ends mid-character: its text comes with the next one
        finish = out.finish_reason if out.finished else None
        choice: JsonObject
        calls = False  # the chunk carries tool calls
        if self.endpoint == "completion":
            if self._stream_offsets is None:
                self._stream_offsets = TextOffsets(self.decode, self.echo_chars, self.prompt_ids)
            offsets = self._stream_offsets.of(lp.token_id for lp in out.new_logprobs or [])
            choice = {"index": self.index, "text": out.new_text, "finish_reason": finish,
                      "stop_reason": out.stop_reason if out.finished else None,
                      "logprobs": self._completion_logprobs(out.new_logprobs, offsets)}
            obj = "text_completion"
        else:
            delta = self._delta(out)
            if delta is None:
                return []  # held back: a tool call may be starting
            calls = "tool_calls" in delta
            finish = self._tool_finish_reason(calls or self._tool_stream.opened) \
                if finish is not None and self._tool_stream is not None else finish
            choice = {"index": self.index, "delta": delta, "finish_reason": finish,
                      "stop_reason": out.stop_reason if out.finished else None,
                      "logprobs": self._chat_logprobs(out.new_logprobs)}
            obj = "chat.completion.chunk"
        if self.return_token_ids:
            choice["token_ids"] = _json_list(out.new_token_ids)
        body: JsonObject = {"id": self.response_id, "object": obj, "created": self.created,
                            "model": self.model, "choices": [choice]}
        if self.return_token_ids and self.prompt_token_ids is not None:
            # vLLM's places, once per stream (the proxy continues a migrated stream from them: proxy/migrate.py)
            (choice if self.endpoint == "completion" else body)["prompt_token_ids"] = _json_list(self.prompt_token_ids)
            self.prompt_token_ids = None
        if out.finished and self.kv_transfer_params is not None:
            body["kv_transfer_params"] = self.kv_transfer_params
        if finish is not None and calls:
            return _finish_apart(body, choice)
        return [body]

    def _delta(self, out: RequestOutput) -> JsonObject | None:
        """A chat chunk's delta (the role with the first), or None while a tool call may be starting. With
        return_token_ids a held-back step still goes out, its delta empty, carrying its ids (vLLM's), so a stream's
        token_ids add up to every generated id."""
        delta: JsonObject = {"content": out.new_text}
        if self.tool_calling is not None:
            if self._tool_stream is None:
                self._tool_stream = ToolStream(self.tool_calling)
            delta = self._tool_stream.delta(out.new_text, out.finished)
            if not delta and not out.finished and self._sent_role and not out.new_logprobs \
                    and not (self.return_token_ids and out.new_token_ids):
                return None
        if not self._sent_role:
            delta["role"] = "assistant"
            self._sent_role = True
        return delta

    def _tool_finish_reason(self, called: bool) -> str | None:
        """vLLM's: "tool_calls" when auto or required called tools; a named call stays "stop"."""
        if called and self.finish_reason == "stop" and self.tool_calling is not None \
                and self.tool_calling.mode != "named":
            return "tool_calls"
        return self.finish_reason

    def usage_chunk(self, usage: JsonObject) -> JsonObject:
        obj = "text_completion" if self.endpoint == "completion" else "chat.completion.chunk"
        return {"id": self.response_id, "object": obj, "created": self.created, "model": self.model,
                "choices": [], "usage": usage}

    # -- logprobs ------------------------------------------------------------------------------------
    def _whole_offsets(self) -> list[int]:
        """The text_offset of a whole response's logprobs: an echoed prompt's tokens from the text's start, then
        the output's after the echoed prompt."""
        ids = [lp.token_id for lp in self.logprobs or []]
        echoed = self.echo_logprobs
        return TextOffsets(self.echo_decode or self.decode).of(ids[:echoed]) + \
            TextOffsets(self.decode, self.echo_chars, self.prompt_ids).of(ids[echoed:])

    def _completion_logprobs(self, items: list[TokenLogprob] | None, offsets: list[int],
                             first_has_none: bool = False) -> JsonObject | None:
        """`offsets`: each item's text_offset (TextOffsets). `first_has_none`: the first item is an echoed prompt's
        first token, which nothing predicts. Each position's top_logprobs holds the `logprobs` most likely tokens and
        the chosen one (OpenAI's legacy completions: "up to logprobs+1 elements"; vLLM's too), so `logprobs: 0` still
        names the chosen token's logprob."""
        if items is None:
            return None
        tokens = [self.detokenize(lp.token_id) for lp in items]
        token_logprobs: list[JsonValue] = [lp.logprob for lp in items]
        top: list[JsonValue] = []
        for tok, lp in zip(tokens, items, strict=True):
            alternatives: JsonObject = {}
            for t, v in lp.top.items():  # most likely first: of two sharing a text, the key keeps the likelier's
                alternatives.setdefault(self.detokenize(t), v)
            alternatives[tok] = lp.logprob  # the chosen token's own, should another token share its text
            top.append(alternatives)
        if first_has_none and items:
            token_logprobs[0] = top[0] = None
        return {"tokens": _json_list(tokens), "token_logprobs": token_logprobs, "top_logprobs": top,
                "text_offset": _json_list(offsets)}

    def _vllm_prompt_logprobs(self, items: list[TokenLogprob | None]) -> list[JsonValue]:
        """vLLM's shape: per prompt position None (the first) or {token id: {logprob, rank, decoded_token}},
        the prompt's token first, then the top alternatives (ranked 1..k)."""
        def entry(token_id: int, logprob: float, rank: int | None) -> JsonObject:
            return {"logprob": logprob, "rank": rank, "decoded_token": self.detokenize(token_id)}

        out: list[JsonValue] = []
        for lp in items:
            if lp is None:
                out.append(None)
                continue
            ranked: JsonObject = {str(lp.token_id): entry(lp.token_id, lp.logprob, lp.rank)}
            for rank, (token_id, value) in enumerate(lp.top.items(), start=1):
                ranked.setdefault(str(token_id), entry(token_id, value, rank))
            out.append(ranked)
        return out

    def _chat_logprobs(self, items: list[TokenLogprob] | None) -> JsonObject | None:
        if items is None:
            return None

        def entry(token_id: int, logprob: float) -> JsonObject:
            token = self.detokenize(token_id)
            return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

        return {"content": [
            {**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top.items()]}
            for lp in items
        ]}


def _finish_apart(body: JsonObject, choice: JsonObject) -> list[JsonObject]:
    """A chunk that finishes its choice with tool calls as two: the calls unfinished, then the finish with an empty
    delta (and what a finishing chunk carries: kv_transfer_params), as OpenAI's streams end. The openai
    client's stream helper ends a call (its `tool_calls.function.arguments.done` event) only at the next call or at
    a later chunk that finishes the choice, so a call sent with the finish never ended there."""
    calls: JsonObject = {**body, "choices": [{**choice, "finish_reason": None, "stop_reason": None}]}
    calls.pop("kv_transfer_params", None)
    end: JsonObject = {**choice, "delta": {}, "logprobs": None}
    if "token_ids" in end:
        end["token_ids"] = []
    return [calls, {k: v for k, v in body.items() if k != "prompt_token_ids"} | {"choices": [end]}]


def _json_list(values: Sequence[JsonValue]) -> list[JsonValue]:
    """`values` as a JSON list (a list[int] is one, but lists are invariant for the type checker)."""
    return list(values)


def mark_recomputed(body: JsonObject) -> JsonObject:
    """`body` (an answer, or its stream event with usage) saying that its prompt was computed here rather than
    loaded from its remote prefill (PROMPT_RECOMPUTED)."""
    params = body.get("kv_transfer_params")
    body["kv_transfer_params"] = {**(params if isinstance(params, dict) else {}), PROMPT_RECOMPUTED: True}
    return body


def usage_body(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> JsonObject:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}
