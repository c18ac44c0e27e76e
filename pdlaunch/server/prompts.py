"""Prompts to token ids, in the HTTP process but off the engine thread and off the event loop.

A prompt longer than MAX_PROMPT_CHARS_PER_TOKEN characters per token of max_model_len cannot fit
whatever the tokenizer does, so it is refused with a 400 before any tokenizing (a 10 MB prompt took
59 s to tokenize on the engine thread while every other request of the instance waited). Real
tokenizers average 3-5 characters per token and the longest single tokens (runs of spaces in code
vocabularies) stay well below 32, so nothing that could fit is refused. A chat's messages count their
every templated field and one token each (_check_chat_size). Tokenizing and chat
templating run off the engine thread, which only gets token ids: on the event loop for a request whose prompts
hold at most INLINE_PROMPT_CHARS characters together (and, for a chat, INLINE_CHAT_MESSAGES messages), else each
prompt in a worker thread (`asyncio.to_thread`). The thread's hand-over and return cost more than such a prompt's
tokenizing (~0.3 ms on an idle 2-core CPU, several ms on a busy one). A thread leaves the event loop free while it
encodes (Tokenizer.encode releases the GIL; `tokenizers`' own encode held it throughout: a 1.4M-character prompt
stopped the event loop 8 s) and interleaves a long chat's template rendering (Python) with it. The bounds are on
the request's prompts together: a list of 128 prompts of 8,192 characters each, every one short alone, held the
event loop ~0.5 s when each short one was tokenized there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from jinja2 import TemplateError

from pdlaunch.errors import PdlaunchError
from pdlaunch.http.errors import OpenAIError
from pdlaunch.server.chat_template import ChatPrompt, render

if TYPE_CHECKING:
    from pdlaunch.model.tokenizer import Tokenizer

MAX_PROMPT_CHARS_PER_TOKEN = 32
INLINE_PROMPT_CHARS = 8192  # encoded in ~2 ms on a 2-core CPU (the demo tokenizer), rendered in ~20 us
INLINE_CHAT_MESSAGES = 64

# Text, token ids, or a chat request (messages with text content, template controls).
Prompt = str | list[int] | ChatPrompt


def check_prompt_size(prompt: Prompt, max_model_len: int) -> int:
    """400 when the prompt cannot fit in max_model_len tokens, decided without tokenizing; else the characters it
    has (a chat's: ChatPrompt.num_chars; token ids: 0)."""
    param = "prompt"
    if isinstance(prompt, str):
        chars = len(prompt)
    elif isinstance(prompt, ChatPrompt):
        return _check_chat_size(prompt, max_model_len)
    else:
        if len(prompt) > max_model_len:
            raise OpenAIError(400, f"prompt has {len(prompt)} token ids; max_model_len is {max_model_len}",
                              param="prompt")
        return 0
    bound = max_model_len * MAX_PROMPT_CHARS_PER_TOKEN
    if chars > bound:
        raise OpenAIError(400, f"{param} has {chars} characters; at most {bound} can fit (max_model_len "
                               f"{max_model_len} x {MAX_PROMPT_CHARS_PER_TOKEN} characters per token); shorten it",
                          param=param)
    return chars


def _check_chat_size(prompt: ChatPrompt, max_model_len: int) -> int:
    """Every message takes at least one token of the template's own (its role header or end-of-turn marker)
    besides its text: 100,000 empty messages hold no text, yet took 11 s to render and tokenize before the
    engine refused their 400,000 tokens."""
    chars, count = prompt.num_chars(), len(prompt.messages)
    if count + chars / MAX_PROMPT_CHARS_PER_TOKEN > max_model_len:
        raise OpenAIError(400, f"messages: {count} message(s) of {chars} characters (with the tools and "
                               f"chat_template_kwargs) cannot fit in max_model_len {max_model_len}: each message takes "
                               f"at least one token and a token holds at most {MAX_PROMPT_CHARS_PER_TOKEN} characters; "
                               "send fewer or shorter messages", param="messages")
    return chars


def tokenize(tokenizer: Any, prompt: Prompt) -> list[int]:  # a Tokenizer; the proxy passes its optional one
    """Token ids of a prompt; chat messages go through the checkpoint's chat template first."""
    try:
        if isinstance(prompt, str):
            return list(tokenizer.encode(prompt))
        if isinstance(prompt, ChatPrompt):
            templated = render(tokenizer, prompt)
            return list(tokenizer.encode(templated, add_special_tokens=prompt.add_special_tokens))
    except PdlaunchError as exc:
        raise OpenAIError(400, exc.render(), param=exc.field or "prompt") from None
    except TemplateError as exc:
        raise OpenAIError(400, f"chat template failed: {exc}", param="messages") from None
    return list(prompt)  # token ids: the engine checks their range


def tokenizes_inline(prompts: Sequence[Prompt], chars: int) -> bool:
    """Whether a request's `prompts`, of `chars` characters together (check_prompt_size), are tokenized on the
    event loop (module doc)."""
    messages = sum(len(p.messages) for p in prompts if isinstance(p, ChatPrompt))
    return chars <= INLINE_PROMPT_CHARS and messages <= INLINE_CHAT_MESSAGES


async def prompts_token_ids(tokenizer: Tokenizer, prompts: Sequence[Prompt], max_model_len: int) -> list[list[int]]:
    """Each prompt's token ids, every prompt's size checked before any is tokenized."""
    chars = sum(check_prompt_size(p, max_model_len) for p in prompts)
    if tokenizes_inline(prompts, chars):
        return [list(p) if isinstance(p, list) else tokenize(tokenizer, p) for p in prompts]
    return [list(p) if isinstance(p, list) else await asyncio.to_thread(tokenize, tokenizer, p) for p in prompts]
