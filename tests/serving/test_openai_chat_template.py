"""Chat template controls: add_generation_prompt, continue_final_message, chat_template_kwargs,
tool messages and assistant tool_calls in the history, and `--chat-template FILE`."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.engine.llm_engine import LLMEngine
from pdlaunch.errors import PdlaunchError
from pdlaunch.http.errors import OpenAIError
from pdlaunch.model.demo_tokenizer import write_tokenizer_files
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import ChatPrompt, render
from tests.serving.helpers import in_process_instance

# Renders what the demo template drops: tool calls (arguments as a mapping), tool results, tools,
# and a template variable from chat_template_kwargs.
TOOL_TEMPLATE = (
    "{% if tools %}[tools {{ tools | map(attribute='function.name') | join(',') }}]{% endif %}"
    "{% if greeting is defined %}[{{ greeting }}]{% endif %}"
    "{% for m in messages %}<{{ m.role }}>"
    "{% if m.tool_calls %}{% for c in m.tool_calls %}call {{ c.function.name }} {{ c.function.arguments | tojson }}"
    "{% endfor %}{% endif %}"
    "{% if m.role == 'tool' %}({{ m.tool_call_id }}){% endif %}{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
HISTORY = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function",
         "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    directory = tmp_path_factory.mktemp("tok")
    write_tokenizer_files(directory)
    return Tokenizer(directory)


def chat(**fields: Any) -> ChatPrompt:
    return ChatCompletionRequest.model_validate({"messages": HISTORY, **fields}).template_messages()


def test_generation_prompt_on_and_off(tokenizer: Tokenizer) -> None:
    on = render(tokenizer, chat())
    off = render(tokenizer, chat(add_generation_prompt=False))
    assert on == off + "<|assistant|>\n"


def test_continue_final_message_leaves_the_last_turn_open(tokenizer: Tokenizer) -> None:
    messages = [{"role": "user", "content": "Count:"}, {"role": "assistant", "content": "one, two,"}]
    prompt = ChatCompletionRequest.model_validate(
        {"messages": messages, "add_generation_prompt": False, "continue_final_message": True}).template_messages()
    assert render(tokenizer, prompt).endswith("<|assistant|>\none, two,")
    with pytest.raises(OpenAIError) as info:  # both at once: refused as vLLM does
        ChatCompletionRequest.model_validate({"messages": messages, "continue_final_message": True}).template_messages()
    assert info.value.param == "continue_final_message"


def test_tool_history_and_kwargs_reach_the_template(tokenizer: Tokenizer, tmp_path: Path) -> None:
    path = tmp_path / "tools.jinja"
    path.write_text(TOOL_TEMPLATE)
    tokenizer.override_chat_template(str(path))
    try:
        text = render(tokenizer, chat(chat_template_kwargs={"greeting": "hi"}))
    finally:
        write_tokenizer_files(tmp_path)
        tokenizer.chat_template = Tokenizer(tmp_path).chat_template
    assert text == ('[hi]<user>Weather in Paris?</user><assistant>call get_weather {"city": "Paris"}</assistant>'
                    "<tool>(call_1)sunny</tool><assistant>")


@pytest.mark.parametrize(("fields", "param"), [
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs.messages"),
    ({"chat_template": "{{ messages }}"}, "chat_template"),
])
def test_refusals_name_the_field(fields: dict[str, Any], param: str) -> None:
    with pytest.raises(OpenAIError) as info:
        chat(**fields)
    assert info.value.param == param


def test_bad_override_names_the_config_key(tokenizer: Tokenizer, tmp_path: Path) -> None:
    for value in (str(tmp_path / "missing.jinja"), "{% for %}"):
        with pytest.raises(PdlaunchError) as info:
            tokenizer.override_chat_template(value)
        assert info.value.field == "model.chat_template"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, LLMEngine]]:
    template = tmp_path_factory.mktemp("template") / "tools.jinja"
    template.write_text(TOOL_TEMPLATE)
    cfg = DeploymentConfig.model_validate({
        "device": "cpu", "colocated": True, "instances": [{"role": "colocated"}],
        "model": {"path": "tiny", "chat_template": str(template)}, "cache": {"num_gpu_blocks": 64},
        "security": {"deployment_secret": "test-deployment-secret-0123456789"},
    })
    with in_process_instance(cfg, "chat-template-0", max_pending_requests=8) as (url, loop):
        yield url, loop.engine


def test_chat_template_file_and_controls_over_http(server: tuple[str, LLMEngine]) -> None:
    url, engine = server
    tok = engine.tokenizer

    def prompt_tokens(**fields: Any) -> int:
        body = {"model": "tiny", "messages": HISTORY, "max_tokens": 2, "temperature": 0.0, **fields}
        answer = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
        assert answer.status_code == 200, answer.text
        return int(answer.json()["usage"]["prompt_tokens"])

    expected = ('[hi]<user>Weather in Paris?</user><assistant>call get_weather {"city": "Paris"}</assistant>'
                "<tool>(call_1)sunny</tool>")
    # vLLM's default: the rendering as it is (this template renders no BOS); add_special_tokens true adds one
    assert prompt_tokens(chat_template_kwargs={"greeting": "hi"}, add_generation_prompt=False) == \
        len(tok.encode(expected, add_special_tokens=False))
    assert prompt_tokens() == len(tok.encode(expected.removeprefix("[hi]") + "<assistant>", add_special_tokens=False))
    assert prompt_tokens(add_special_tokens=True) == len(tok.encode(expected.removeprefix("[hi]") + "<assistant>"))
    bad = httpx.post(f"{url}/v1/chat/completions", timeout=60, json={
        "model": "tiny",
        "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{"}}]}]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages.0.tool_calls.0.function.arguments"
    assert json.loads(json.dumps(HISTORY))  # the history itself stays OpenAI-shaped (arguments a string)
    assert isinstance(HISTORY[1]["tool_calls"][0]["function"]["arguments"], str)  # type: ignore[index]
