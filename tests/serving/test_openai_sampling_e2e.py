"""Every sampling field through the proxy with the openai client, PD (1P1D) and colocated, on CPU:
each changes the output as specified (or is refused with a 400 naming it), and PD == colocated;
json_schema outputs validate and tool calls parse, streaming and not.

The PD deployment runs with --async-scheduling (the default with CUDA; off by default on CPU) and the
colocated one without, so PD == colocated is also async scheduling == one step at a time, end to end."""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from pdlaunch.model.demo_tokenizer import EOS_TOKEN_ID
from tests.serving.e2e import Serve

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "The quick brown fox jumps over the lazy dog. The quick brown"
GREEDY = {"temperature": 0.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def deployments(llama_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Serve]]:
    common = ["--model", str(llama_ckpt), "--num-gpu-blocks", "256", "--max-num-seqs", "16"]
    started: dict[str, Serve] = {}
    try:
        started["pd"] = Serve(tmp_path_factory.mktemp("pd"), [*common, "--prefill", "1", "--decode", "1",
                                                              "--async-scheduling"])
        started["colocated"] = Serve(tmp_path_factory.mktemp("colocated"), [*common, "--colocated"])
        yield {name: s.wait_ready() for name, s in started.items()}
    finally:
        for s in started.values():
            s.stop()


def complete(serve: Serve, **fields: Any) -> dict[str, Any]:
    client = openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0)
    model = httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]
    standard = {k: fields.pop(k) for k in list(fields) if k in ("temperature", "max_tokens", "seed", "stop",
                                                               "presence_penalty", "frequency_penalty",
                                                               "logit_bias")}
    out = client.completions.create(model=model, prompt=PROMPT, **standard,
                                    extra_body={"return_token_ids": True, "ignore_eos": True, **fields})
    choice = out.choices[0].model_dump()
    return {"text": choice["text"], "ids": choice["token_ids"], "finish": choice["finish_reason"]}


def both(deployments: dict[str, Serve], **fields: Any) -> dict[str, Any]:
    """The colocated answer, after checking that PD gives the same one."""
    pd, colocated = (complete(deployments[name], **dict(fields)) for name in ("pd", "colocated"))
    assert pd == colocated, f"PD and colocated differ for {fields}"
    return colocated


@pytest.fixture(scope="module")
def base(deployments: dict[str, Serve]) -> dict[str, Any]:
    out = both(deployments, **GREEDY)
    assert len(set(out["ids"])) < len(out["ids"]), "the random model should repeat itself"
    return out


CHANGES = {
    "logit_bias": (lambda b: {"logit_bias": {str(b["ids"][0]): -100}}, lambda o, b: o["ids"][0] != b["ids"][0]),
    "allowed_token_ids": (lambda b: {"allowed_token_ids": [3, 4]}, lambda o, b: set(o["ids"]) <= {3, 4}),
    "repetition_penalty": (lambda b: {"repetition_penalty": 2.0}, lambda o, b: o["ids"] != b["ids"]),
    "frequency_penalty": (lambda b: {"frequency_penalty": 2.0}, lambda o, b: o["ids"] != b["ids"]),
    "presence_penalty": (lambda b: {"presence_penalty": 2.0}, lambda o, b: o["ids"] != b["ids"]),
    "stop_token_ids": (lambda b: {"stop_token_ids": [b["ids"][2]], "ignore_eos": False},
                       lambda o, b: o["ids"] == b["ids"][:b["ids"].index(b["ids"][2]) + 1] and o["finish"] == "stop"),
    "stop": (lambda b: {"stop": [b["text"][4:7]]}, lambda o, b: o["text"] == b["text"][:4]),
    "include_stop_str_in_output": (lambda b: {"stop": [b["text"][4:7]], "include_stop_str_in_output": True},
                                   lambda o, b: o["text"] == b["text"][:7]),
    "min_tokens": (lambda b: {"min_tokens": 5, "ignore_eos": False, "logit_bias": {str(EOS_TOKEN_ID): 100}},
                   lambda o, b: len(o["ids"]) == 6 and o["ids"][-1] == EOS_TOKEN_ID),
    "skip_special_tokens": (lambda b: {"skip_special_tokens": False, "logit_bias": {str(EOS_TOKEN_ID): 100}},
                            lambda o, b: o["ids"] == [EOS_TOKEN_ID] * 12 and o["text"] != ""),
    "spaces_between_special_tokens": (
        # true, vLLM's default, keeps the tokenizer's joining: byte-level BPE puts no space between special tokens
        lambda b: {"skip_special_tokens": False, "spaces_between_special_tokens": True,
                   "logit_bias": {str(EOS_TOKEN_ID): 100}},
        lambda o, b: o["ids"] == [EOS_TOKEN_ID] * 12 and o["text"] == "<|end_of_text|>" * 12),
    "min_p": (lambda b: {"temperature": 1.5, "seed": 5, "min_p": 1.0}, lambda o, b: o["ids"] == b["ids"]),
    "bad_words": (lambda b: {"bad_words": [b["text"].split()[0]]},  # several tokens: the last one is banned
                  lambda o, b: b["text"].split()[0] not in o["text"] and o["ids"] != b["ids"]),
}


@pytest.mark.parametrize("field", sorted(CHANGES))
def test_field_changes_output_pd_equals_colocated(deployments: dict[str, Serve], base: dict[str, Any],
                                                  field: str) -> None:
    make, holds = CHANGES[field]
    out = both(deployments, **{**GREEDY, **make(base)})
    assert holds(out, base), f"{field}: {out} vs greedy {base}"


def test_seeded_sampling_is_reproducible_across_pd_and_colocated(deployments: dict[str, Serve]) -> None:
    a = both(deployments, temperature=1.0, max_tokens=12, seed=11)
    b = both(deployments, temperature=1.0, max_tokens=12, seed=12)
    assert a != b


@pytest.mark.parametrize(("fields", "param"), [
    ({"repetition_penalty": -1.0}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"min_tokens": 50}, "min_tokens"), ({"min_p": 2}, "min_p"), ({"logit_bias": {"99999": 1}}, "logit_bias"),
    ({"stop_token_ids": [99999]}, "stop_token_ids"),  # no token can match it: it was accepted and did nothing
    ({"n": 0}, "n"), ({"n": 3, "best_of": 2}, "best_of"), ({"echo": True, "logprobs": 1, "stream": True}, "echo"),
    ({"response_format": {"type": "structural_tag"}}, "response_format.type"),
    ({"guided_regex": "a(b"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format.json_schema.schema"),
])
def test_refused_fields_are_a_400_naming_them(deployments: dict[str, Serve], fields: dict[str, Any],
                                              param: str) -> None:
    for serve in deployments.values():
        answer = httpx.post(f"{serve.url}/v1/completions", json={"prompt": PROMPT, **GREEDY, **fields}, timeout=60)
        assert answer.status_code == 400, answer.text
        assert answer.json()["error"]["param"] == param


def test_every_refused_field_is_a_400_through_the_proxy(deployments: dict[str, Serve]) -> None:
    from tests.serving.test_openai_fields import ASKING, CASES

    for serve in deployments.values():
        for field, chat in CASES:
            path, body = ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}) if chat else \
                ("/v1/completions", {"prompt": PROMPT})
            answer = httpx.post(f"{serve.url}{path}", json={**body, **GREEDY, field: ASKING[field]}, timeout=60)
            assert answer.status_code == 400 and answer.json()["error"]["param"] == field, (field, answer.text)


def chat_client(serve: Serve) -> tuple[openai.OpenAI, str]:
    model = httpx.get(f"{serve.url}/v1/models", timeout=5).json()["data"][0]["id"]
    return openai.OpenAI(base_url=f"{serve.url}/v1", api_key="unused", timeout=120, max_retries=0), model


def test_json_schema_validates_streaming_and_not_pd_equals_colocated(deployments: dict[str, Serve]) -> None:
    import jsonschema

    from tests.engine.test_structured_output import random_schema

    rng = random.Random(3)
    for i in range(5):
        schema = random_schema(rng)
        fmt = {"type": "json_schema", "json_schema": {"name": f"s{i}", "schema": schema}}
        texts = []
        for name in ("pd", "colocated"):
            client, model = chat_client(deployments[name])
            kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Give JSON"}],
                                      "response_format": fmt, "max_tokens": 160, "temperature": 0}
            whole = client.chat.completions.create(**kwargs).choices[0].message.content or ""
            streamed = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(
                stream=True, **kwargs) if c.choices)
            assert whole == streamed
            jsonschema.validate(json.loads(whole), schema)
            texts.append(whole)
        assert texts[0] == texts[1]


def test_tool_calls_through_the_proxy_parse_into_the_functions_arguments(deployments: dict[str, Serve]) -> None:
    tool = {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 6},
                                         "days": {"type": "integer", "minimum": 1, "maximum": 5}},
        "required": ["city", "days"], "additionalProperties": False}}}
    seen = []
    for name in ("pd", "colocated"):
        client, model = chat_client(deployments[name])
        for choice in ({"type": "function", "function": {"name": "get_weather"}}, "required"):
            # One call: a random model would otherwise add array elements until max_tokens.
            kwargs: dict[str, Any] = {"model": model, "messages": [{"role": "user", "content": "Weather?"}],
                                      "tools": [tool], "tool_choice": choice, "max_tokens": 120, "temperature": 0,
                                      "parallel_tool_calls": False}
            calls = client.chat.completions.create(**kwargs).choices[0].message.tool_calls or []
            streamed = [tc for c in client.chat.completions.create(stream=True, **kwargs) if c.choices
                        for tc in (c.choices[0].delta.tool_calls or [])]
            assert calls and calls[0].function.name == "get_weather"
            args = json.loads(calls[0].function.arguments)
            assert set(args) == {"city", "days"} and 1 <= args["days"] <= 5
            assert streamed[0].function.name == "get_weather"
            seen.append(args)
    assert seen[:2] == seen[2:]  # PD == colocated


def transfer_count(serve: Serve) -> float:
    """KV transfers the instances of `serve` recorded (the seconds histogram counts one per transfer)."""
    total = 0.0
    for url in serve.instance_urls().values():
        for line in httpx.get(f"{url}/metrics", timeout=5).text.splitlines():
            if line.startswith("pdlaunch_kv_transfer_seconds_count"):
                total += float(line.split()[1])
    return total


def test_n_4_moves_the_prompt_kv_once_and_equals_colocated(deployments: dict[str, Serve]) -> None:
    answers = []
    for name in ("pd", "colocated"):
        client, model = chat_client(deployments[name])
        before = transfer_count(deployments[name])
        out = client.completions.create(model=model, prompt=PROMPT * 3, n=4, max_tokens=8, temperature=1.0, seed=21,
                                        extra_body={"ignore_eos": True})
        assert [c.index for c in out.choices] == [0, 1, 2, 3]
        answers.append([c.text for c in out.choices])
        if name == "pd":
            assert transfer_count(deployments[name]) - before == 1
    assert answers[0] == answers[1] and len(set(answers[0])) > 1


def test_n_2_streamed_chat_through_pd_equals_colocated(deployments: dict[str, Serve]) -> None:
    texts = []
    for name in ("pd", "colocated"):
        client, model = chat_client(deployments[name])
        streamed = ["", ""]
        for chunk in client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hi"}], n=2,
                                                    max_tokens=8, temperature=1.0, seed=4, stream=True):
            for choice in chunk.choices:
                streamed[choice.index] += choice.delta.content or ""
        texts.append(streamed)
    assert texts[0] == texts[1] and texts[0][0] != texts[0][1]
