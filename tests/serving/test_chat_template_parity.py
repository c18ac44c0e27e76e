"""A chat request renders the text vLLM renders (it calls transformers' apply_chat_template), so both send the
model the same prompt token ids: the template environment, the tools and the messages the template gets, and
continue_final_message."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from transformers.utils.chat_template_utils import render_jinja_template

from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import render

# A tool whose description holds what Jinja's own tojson escapes for HTML, and non-ASCII text.
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Weather <city> & 'more' in Zürich",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Zürich"}'}}]}
MESSAGES = [{"role": "user", "content": "Weather?"}, CALL, {"role": "tool", "tool_call_id": "call_1", "content": "<b>"}]


@pytest.fixture
def tokenizer(tmp_path: Path) -> Tokenizer:
    write_tokenizer_files(tmp_path)
    return Tokenizer(tmp_path)


def rendered(tokenizer: Tokenizer, template: str, **fields: Any) -> str:
    tokenizer.chat_template = template
    return render(tokenizer, ChatCompletionRequest.model_validate(fields).template_messages())


def transformers_rendered(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    text: str = render_jinja_template(conversations=[messages], tools=tools, chat_template=template,
                                      add_generation_prompt=True)[0][0]
    return text


@pytest.mark.parametrize("template", [
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}",  # Qwen 2.5 / 3
    "{% for t in tools %}{{ t | tojson(indent=4) }}{% endfor %}",  # Llama 3.1
    "{% for m in messages %}{% for c in m.tool_calls or [] %}{{ c.function.arguments | tojson }}{% endfor %}"
    "{{ m.content | tojson }}{% endfor %}",
    "{{ messages[0] | tojson(separators=(',', ':'), sort_keys=true) }}",
])
def test_tojson_renders_as_transformers_does(tokenizer: Tokenizer, template: str) -> None:
    ours = rendered(tokenizer, template, messages=MESSAGES, tools=[TOOL])
    template_messages = [{"role": "user", "content": "Weather?"},
                         {**CALL, "content": "", "tool_calls": [{**CALL["tool_calls"][0], "function": {  # type: ignore[index]
                             "name": "get_weather", "arguments": {"city": "Zürich"}}}]},
                         MESSAGES[2]]
    assert ours == transformers_rendered(template, template_messages, [TOOL])
    assert "\\u" not in ours  # neither HTML-escaped nor ASCII-escaped


def test_tools_keep_the_order_the_client_wrote(tokenizer: Tokenizer) -> None:
    text = rendered(tokenizer, "{{ tools[0] | tojson }}", messages=MESSAGES, tools=[TOOL])
    assert text.startswith('{"type": "function", "function": {"name": "get_weather", "description": "Weather <city> &')


@pytest.mark.parametrize(("template", "expected"), [
    ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}", "Weather?"),
    ("{% for m in messages %}{% if m.role != 'tool' %}{% continue %}{% endif %}{{ m.content }}{% endfor %}", "<b>"),
    ("{% for m in messages %}{% generation %}[{{ m.role }}]{% endgeneration %}{% endfor %}",
     "[user][assistant][tool]"),
])
def test_loop_controls_and_generation_blocks_render(tokenizer: Tokenizer, template: str, expected: str) -> None:
    assert rendered(tokenizer, template, messages=MESSAGES) == expected


LLAMA3_LIKE = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n"
               "{{ m.content | trim }}<|eot_id|>{% endfor %}"
               "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}")
KEEPS_SPACES = "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"


@pytest.mark.parametrize(("template", "final", "expected_end"), [
    (LLAMA3_LIKE, "Once upon a time ", "assistant<|end_header_id|>\n\nOnce upon a time"),  # trimmed: cut after it
    (LLAMA3_LIKE, "  Once upon a time", "assistant<|end_header_id|>\n\nOnce upon a time"),
    (KEEPS_SPACES, "Once upon a time ", "<assistant>Once upon a time "),  # kept by the template: kept
    (KEEPS_SPACES, "Once", "<assistant>Once"),
])
def test_continue_final_message_where_the_template_trims_it(tokenizer: Tokenizer, template: str, final: str,
                                                            expected_end: str) -> None:
    messages = [{"role": "user", "content": "A story"}, {"role": "assistant", "content": final}]
    text = rendered(tokenizer, template, messages=messages, add_generation_prompt=False, continue_final_message=True)
    assert text.endswith(expected_end), text
    assert text.count("assistant") == 1  # the final message's end of turn is cut, nothing else is added


@pytest.mark.parametrize(("function", "expected"), [
    ({"name": "now"}, '{"type": "function", "function": {"name": "now", "description": null, "parameters": null}}'),
    ({"name": "now", "strict": True, "description": None},
     '{"type": "function", "function": {"name": "now", "description": null, "parameters": null, "strict": true}}'),
])
def test_tools_reach_the_template_with_every_field_vllm_gives(tokenizer: Tokenizer, function: dict[str, Any],
                                                              expected: str) -> None:
    text = rendered(tokenizer, "{{ tools[0] | tojson }}", messages=MESSAGES[:1],
                    tools=[{"type": "function", "function": function}])
    assert text == expected
