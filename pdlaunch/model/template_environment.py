"""The Jinja environment chat templates render in, built as transformers' apply_chat_template builds it.

vLLM renders chat requests with transformers, so a template must render the same text here for a request to
get the same prompt token ids:
- `tojson` is transformers' own: keys in the given order, non-ASCII and `<`, `>`, `&`, `'` as they are, and its
  `indent`, `separators` and `sort_keys` arguments. Jinja's built-in sorts the keys and escapes those characters
  for HTML (`\\u003c`), which changed the tool definitions that Qwen and Llama 3.1 templates render.
- `{% break %}` / `{% continue %}` (jinja2.ext.loopcontrols) and `{% generation %}...{% endgeneration %}`
  (transformers marks the assistant's tokens with it; the text renders as is) compile.
- `raise_exception(message)` and `strftime_now(format)`, the functions templates call.
The environment is sandboxed and immutable: a template cannot reach Python objects or change its inputs.
"""

from __future__ import annotations

import json
from datetime import datetime

from jinja2 import nodes
from jinja2.exceptions import TemplateError
from jinja2.ext import Extension, loopcontrols
from jinja2.parser import Parser
from jinja2.runtime import Macro
from jinja2.sandbox import ImmutableSandboxedEnvironment


class GenerationBlock(Extension):
    """`{% generation %}...{% endgeneration %}`: the block's text, unchanged."""

    tags = {"generation"}

    def parse(self, parser: Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Macro) -> str:
        return str(caller())


def tojson(value: object, ensure_ascii: bool = False, indent: int | str | None = None,
           separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def raise_exception(message: str) -> None:
    raise TemplateError(message)


def strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def template_environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env
