"""A chat request as the chat template sees it, and its rendering with vLLM's controls.

- add_generation_prompt (default on): the template appends the assistant's turn header.
- continue_final_message: the rendered text ends right after the last message's content (the
  template's end-of-turn after it is cut; the content's outer whitespace too where the template trims
  it, as transformers cuts it), so the model continues that message; vLLM refuses it together with
  add_generation_prompt, and so do we.
- chat_template_kwargs: extra template variables (e.g. enable_thinking); the names the server
  sets itself are refused rather than silently overridden.
- tools: the request's tool definitions, the `tools` variable of Qwen / Llama 3 templates.
- documents: the request's RAG documents (vLLM's `documents` field), the `documents` variable of Command R /
  Granite style templates; null without it, as transformers always defines it, so `{% if documents %}` and
  `documents is not none` read as they do there. chat_template_kwargs may set it instead (vLLM lets them),
  not together with the field.
- Assistant tool_calls keep their arguments as a mapping (OpenAI sends a JSON string; templates
  render `arguments | tojson`), as vLLM does.
- An assistant's `reasoning` / `reasoning_content` (a reasoning model's earlier thinking, which clients send
  back between tool calls) reaches the template under both names, as vLLM passes it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from jinja2.defaults import DEFAULT_NAMESPACE

from pdlaunch.errors import json_kind
from pdlaunch.http import JsonObject
from pdlaunch.http.errors import OpenAIError

if TYPE_CHECKING:
    from pdlaunch.model.tokenizer import Tokenizer

# The variables the server sets, and the functions templates call (jinja's own, such as namespace(), and those
# the tokenizer adds): a kwarg of that name would replace them (`"namespace": 1` failed every Llama 3 render).
# Not `documents`: chat_template_kwargs may give it when the request's field does not, as vLLM lets them.
RESERVED_TEMPLATE_VARIABLES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token",
                                         "raise_exception", "strftime_now", *DEFAULT_NAMESPACE})
# What a template raises on values it cannot use (a chat_template_kwargs number where it adds strings, a length of
# an integer): the request's values, not the server, so a 400. Jinja's own errors arrive as PdlaunchError.
_RENDER_ERRORS = (TypeError, ValueError, ArithmeticError, LookupError)


@dataclass
class ChatPrompt:
    messages: list[JsonObject]
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    tools: list[JsonObject] | None = None
    template_kwargs: JsonObject | None = None
    # vLLM's default: the rendered text is encoded as it is, so a BOS only where the template renders one (as
    # transformers' apply_chat_template(tokenize=True)); true adds the tokenizer's own (one BOS, never two)
    add_special_tokens: bool = False
    documents: list[dict[str, str]] | None = None

    def __post_init__(self) -> None:
        if self.continue_final_message and self.add_generation_prompt:
            raise OpenAIError(400, "continue_final_message and add_generation_prompt cannot both be true; "
                                   "set add_generation_prompt to false", param="continue_final_message")
        if self.continue_final_message and not _text(self.messages[-1].get("content")).strip():
            raise OpenAIError(400, "continue_final_message needs a final message with text content",
                              param="continue_final_message")
        clash = sorted(RESERVED_TEMPLATE_VARIABLES & set(self.template_kwargs or {}))
        if clash:
            raise OpenAIError(400, f"chat_template_kwargs may not set {', '.join(clash)} (the request's own "
                                   "fields set them)", param=f"chat_template_kwargs.{clash[0]}")
        if self.documents is not None and "documents" in (self.template_kwargs or {}):
            raise OpenAIError(400, "documents is sent twice, as the request's field and in chat_template_kwargs; "
                                   "send it once", param="chat_template_kwargs.documents")

    _num_chars: int | None = field(default=None, init=False, repr=False, compare=False)

    def num_chars(self) -> int:
        """template_chars of this prompt, counted once: the first call (the request's preparation, in a worker
        thread for a large body, http/limits.py:read_prepared) keeps it for the size check on the event loop."""
        if self._num_chars is None:
            self._num_chars = template_chars(self)
        return self._num_chars


def template_chars(prompt: ChatPrompt) -> int:
    """Characters of the request that the template may render (for the size bound before tokenizing): every
    message field it gets (a role, a name, tool calls' arguments, not only the content), the tools, the
    chat_template_kwargs and the documents. JSON without ASCII escapes: a CJK character counts once, not as
    six. An assistant's reasoning counts once, though the template gets it under two names."""
    values: list[object] = [*(v for m in prompt.messages for k, v in m.items() if k != "reasoning"), prompt.tools,
                            prompt.template_kwargs, prompt.documents]
    return sum(len(v) if isinstance(v, str) else len(json.dumps(v, ensure_ascii=False))
               for v in values if v is not None)


def render(tokenizer: Tokenizer, prompt: ChatPrompt) -> str:
    # `documents` is always defined, null without documents, as transformers renders it; the kwargs may set it.
    variables = {"documents": prompt.documents, **(prompt.template_kwargs or {})}
    try:
        text = tokenizer.apply_chat_template(prompt.messages, prompt.add_generation_prompt, prompt.tools, variables)
    except _RENDER_ERRORS as exc:
        param = "chat_template_kwargs" if prompt.template_kwargs else "messages"
        raise OpenAIError(400, f"{param}: the chat template failed on this request's values ({type(exc).__name__}: "
                               f"{exc}); check the types of chat_template_kwargs, messages and tools against what the "
                               "model's template expects", param=param) from None
    return _continued(text, _text(prompt.messages[-1].get("content"))) if prompt.continue_final_message else text


def _continued(text: str, final: str) -> str:
    """`text` cut right after the final message's content, as transformers cuts it: templates that trim the
    content (Llama 3's `| trim`) render it without its outer whitespace, so that is what is looked for, and the
    trailing whitespace stays only where the template kept it."""
    start = text.rfind(final.strip())
    if start < 0:
        raise OpenAIError(400, "the chat template does not render the final message's text verbatim, so it "
                               "cannot be continued", param="continue_final_message")
    kept = final.lstrip()
    end = start + len(kept) if text[start:start + len(kept)] == final else start + len(final.strip())
    return text[:end]


def template_message(role: str, content: str | None, extra: Mapping[str, object], index: int) -> JsonObject:
    """One message (messages[`index`]) for the template: role, text content, what tool calling adds, and an
    assistant's earlier reasoning."""
    message: JsonObject = {"role": role, "content": content or ""}
    for key in ("name", "tool_call_id"):
        value = extra.get(key)
        if isinstance(value, str):
            message[key] = value
    # vLLM's: an assistant's `reasoning` (or its older name `reasoning_content`) reaches the template
    # under both names, as reasoning templates (Qwen3's after the last user turn) render it back in <think>.
    reasoning = extra.get("reasoning") or extra.get("reasoning_content")
    if role == "assistant" and isinstance(reasoning, str):
        message["reasoning"] = message["reasoning_content"] = reasoning
    calls = extra.get("tool_calls")
    if calls is not None:
        where = f"messages.{index}.tool_calls"
        message["tool_calls"] = [_template_tool_call(call, f"{where}.{i}")
                                 for i, call in enumerate(_as_list(calls, where))]
    return message


def _template_tool_call(call: object, param: str) -> JsonObject:
    function_of = call.get("function") if isinstance(call, dict) else None
    if not isinstance(call, dict) or not isinstance(function_of, dict):
        raise OpenAIError(400, "a tool call needs a `function` object", param=param)
    function: JsonObject = dict(function_of)
    if not isinstance(function.get("name"), str):
        raise OpenAIError(400, "a tool call's function needs a `name`", param=f"{param}.function.name")
    arguments = function.get("arguments")
    if isinstance(arguments, str) and arguments:
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError as exc:
            raise OpenAIError(400, f"tool call arguments are not JSON: {exc}",
                              param=f"{param}.function.arguments") from None
        except RecursionError:
            raise OpenAIError(400, "tool call arguments are nested too deep to read (past Python's recursion limit); "
                                   "send the arguments the model wrote, an object of the tool's parameters",
                              param=f"{param}.function.arguments") from None
    if not arguments:  # as vLLM reads them: none, null, "", "null", false, 0, [] are no arguments
        arguments = {}
    elif not isinstance(arguments, dict):  # an object (vLLM's clients send one too) or its JSON text
        where = f"{param}.function.arguments"
        raise OpenAIError(400, f"{where}: must be a JSON string of the arguments (got {json_kind(arguments)}), e.g. "
                               f"{json.dumps(json.dumps({'city': 'Oslo'}))}, as OpenAI sends them (an object is "
                               "taken too)", param=where)
    function["arguments"] = arguments
    return {**call, "type": call.get("type", "function"), "function": function}


def _as_list(value: object, param: str) -> list[object]:
    if not isinstance(value, list):
        raise OpenAIError(400, "tool_calls must be a list", param=param)
    return value


def _text(content: object) -> str:
    return content if isinstance(content, str) else ""
