"""`POST /tokenize`, `POST /detokenize` and `GET /version` of an instance, shaped like vLLM's OpenAI server.

- /tokenize takes `prompt` (text; `add_special_tokens` default true) or `messages` (a chat, rendered by the
  checkpoint's chat template with `add_generation_prompt` default true, `continue_final_message`,
  `chat_template_kwargs`, `tools`; `add_special_tokens` default false, as /v1/chat/completions encodes) and
  answers `{"count", "max_model_len", "tokens", "token_strs"}` (`token_strs` with `return_token_strs`).
  The ids are the ones a completion or chat request with the same fields would send to the engine.
- /detokenize takes `tokens` and answers `{"prompt"}`: the text of those ids, special tokens kept.
- /version answers `{"version"}`: pdlaunch's version.

`model`, when sent, must name a served model (404 otherwise, as the OpenAI routes). Unknown fields are
refused with a 400 naming them: these bodies are small and a misspelt option would change the count.
A body past PARSE_INLINE_BYTES is validated, its chat templated and its size checked in a worker thread
(http/limits.py:read_prepared): a 6.8 MB body of 200,000 messages held /health for 3 s on the event loop.
Tokenizing runs in a worker thread, bounded like a completion's prompt (server/prompts.py).
"""

from __future__ import annotations

import asyncio
import difflib
from functools import partial
from typing import TYPE_CHECKING, ClassVar

from fastapi import Request
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

import pdlaunch
from pdlaunch.errors import PdlaunchError
from pdlaunch.http import JsonObject, JsonValue
from pdlaunch.http.errors import OpenAIError
from pdlaunch.http.limits import read_model, read_prepared
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatMessage, capped_messages, check_messages
from pdlaunch.server.chat_template import ChatPrompt
from pdlaunch.server.instance import Handler, Instance, instance_of
from pdlaunch.server.prompts import check_prompt_size, tokenize
from pdlaunch.server.tool_calls import tool_calling_of
from pdlaunch.server.unsupported_fields import refuse_unsupported

if TYPE_CHECKING:
    from pdlaunch.engine.llm_engine import LLMEngine


class _KnownFieldsOnly(BaseModel):
    """A body whose unknown fields are refused with a 400 naming them (`_refuse_unknown`) for its `ROUTE`."""

    model_config = ConfigDict(extra="forbid", strict=True)
    ROUTE: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: object) -> object:
        if isinstance(data, dict):
            _refuse_unknown(data, cls, cls.ROUTE)
        return data


class TokenizeCompletionRequest(_KnownFieldsOnly):
    ROUTE: ClassVar[str] = "/tokenize"

    model: str | None = None
    prompt: str
    add_special_tokens: bool = True
    return_token_strs: bool | None = False  # null: not sent (vLLM's is nullable)


class TokenizeChatRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    add_special_tokens: bool = False  # as /v1/chat/completions encodes (vLLM's default)
    chat_template_kwargs: JsonObject | None = None
    tools: list[JsonValue] | None = None  # each checked by tool_calling_of, which names one that is no object
    return_token_strs: bool | None = False  # null: not sent (vLLM's is nullable)
    mm_processor_kwargs: JsonObject | None = None  # a text model: only {} (asks for nothing) passes

    @field_validator("messages", mode="before")
    @classmethod
    def _capped(cls, value: object) -> object:
        return capped_messages(value)

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: object) -> object:
        """vLLM's fields we do not honour get the chat route's message rather than "extra input"."""
        if isinstance(data, dict):
            refuse_unsupported({k: data.get(k) for k in ("chat_template", "mm_processor_kwargs")}, chat=True)
            if data.get("chat_template") is None:  # vLLM's client sends its null: not sent, as the chat route reads it
                data = {k: v for k, v in data.items() if k != "chat_template"}
            _refuse_unknown(data, cls, "/tokenize")
        return data

    def chat_prompt(self) -> ChatPrompt:
        check_messages(self.messages)
        calling = tool_calling_of(self.tools, None)
        return ChatPrompt([m.as_template_input(i) for i, m in enumerate(self.messages)], self.add_generation_prompt,
                          self.continue_final_message, calling.template_tools() if calling else None,
                          self.chat_template_kwargs, self.add_special_tokens)


class DetokenizeRequest(_KnownFieldsOnly):
    ROUTE: ClassVar[str] = "/detokenize"

    model: str | None = None
    tokens: list[int]


async def tokenize_route(request: Request) -> JsonObject:
    instance = instance_of(request)
    body, prompt, engine = await read_prepared(request, partial(_prepared_tokenize, instance))
    return await asyncio.to_thread(_tokenized, engine, body, prompt)


def _tokenized(engine: LLMEngine, body: TokenizeChatRequest | TokenizeCompletionRequest,
               prompt: str | ChatPrompt) -> JsonObject:
    """/tokenize's answer, in a worker thread: the ids (and their strings) of a prompt of max_model_len x 32
    characters may number millions."""
    tokenizer = engine.tokenizer
    if isinstance(prompt, ChatPrompt):
        ids = tokenize(tokenizer, prompt)
    else:
        ids = _encode(tokenizer, prompt, body.add_special_tokens)
    token_strs: list[JsonValue] | None = [tokenizer.id_to_token(i) or "" for i in ids] \
        if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": engine.max_model_len, "tokens": list[JsonValue](ids),
            "token_strs": token_strs}


def _prepared_tokenize(instance: Instance, data: JsonObject
                       ) -> tuple[TokenizeChatRequest | TokenizeCompletionRequest, str | ChatPrompt, LLMEngine]:
    """The /tokenize body validated, its model checked, its prompt (a chat's: templated) and its size checked, with
    the engine that tokenizes it: what grows with the body, in a worker thread for a large one (read_prepared)."""
    if "messages" in data and "prompt" in data:
        raise OpenAIError(400, "the body sends both prompt (a text) and messages (a chat): send one of them",
                          param="prompt")
    form: type[TokenizeChatRequest | TokenizeCompletionRequest] = (
        TokenizeChatRequest if "messages" in data else TokenizeCompletionRequest)
    body = form.model_validate(data)
    instance.check_model(body.model)
    engine = instance.engine_loop.require_ready()
    prompt = body.chat_prompt() if isinstance(body, TokenizeChatRequest) else body.prompt
    check_prompt_size(prompt, engine.max_model_len)
    return body, prompt, engine


async def detokenize_route(request: Request) -> JsonObject:
    instance = instance_of(request)
    body = await read_model(request, DetokenizeRequest)
    instance.check_model(body.model)
    tokenizer = instance.engine_loop.require_ready().tokenizer
    return {"prompt": await asyncio.to_thread(_decode, tokenizer, body.tokens)}


async def version(request: Request) -> dict[str, str]:
    return version_body()


def version_body() -> dict[str, str]:
    return {"version": pdlaunch.__version__}


def _refuse_unknown(data: JsonObject, form: type[BaseModel], route: str) -> None:
    """A 400 naming the first field `form` does not take, the closest one it does and all it takes (pydantic's
    words were "Extra inputs are not permitted", and a misspelt required field was reported as missing first)."""
    fields = list(form.model_fields)
    for name in data:
        if name not in fields:
            close = difflib.get_close_matches(name, fields, n=1)
            guess = f"did you mean {close[0]}? " if close else ""
            raise OpenAIError(400, f"{name}: is not a field of {route} ({guess}it takes {', '.join(fields)}); "
                              "remove it or correct its name", param=name)


def _decode(tokenizer: Tokenizer, tokens: list[int]) -> str:
    """The text of `tokens`, special tokens kept; a 400 naming the first id out of the vocabulary. In a worker
    thread with the decoding: a scan of millions of ids held every stream of the instance for a second."""
    vocab = tokenizer.vocab_size
    if tokens and (min(tokens) < 0 or max(tokens) >= vocab):
        bad = next(i for i, t in enumerate(tokens) if not 0 <= t < vocab)
        raise OpenAIError(400, f"tokens[{bad}] = {tokens[bad]} is not a token id of this model's tokenizer "
                               f"(0 .. {vocab - 1})", param="tokens")
    return tokenizer.decode(tokens, False)


def _encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool) -> list[int]:
    try:
        return list(tokenizer.encode(text, add_special_tokens=add_special_tokens))
    except PdlaunchError as exc:
        raise OpenAIError(400, exc.render(), param=exc.field or "prompt") from None


ROUTES: list[tuple[str, str, Handler]] = [
    ("POST", "/tokenize", tokenize_route), ("POST", "/detokenize", detokenize_route), ("GET", "/version", version)]
