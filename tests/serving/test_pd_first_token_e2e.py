"""PD first token (engine/first_token.py) through real `pdlaunch serve` processes, `--model tiny` on CPU:
a 1P1D deployment answers exactly what a colocated one does (text, token ids, logprobs, finish and stop reason,
usage) for greedy and seeded sampling, streaming or not, including max_tokens 1, a first token that
is a stop token or contains a stop string, and min_tokens (which takes the recompute path); the
decode continues from the prefill's token (no recomputed last prompt token); no KV stays held.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from tests.serving.e2e import Serve, pd_and_colocated
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

PROMPT = "The first token of this answer was already sampled by the prefill instance, so"
GREEDY = {"temperature": 0.0}
SEEDED = {"temperature": 1.0, "top_p": 0.95, "seed": 1234}


@pytest.fixture(scope="module")
def deployments(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Serve]]:
    yield from pd_and_colocated(tmp_path_factory, "first-token")


def _ask(serve: Serve, body: dict[str, Any], chat: bool = False) -> dict[str, Any]:
    """One request; a streamed answer is folded into the shape of a whole one (text, token ids, logprobs,
    finish and stop reason, usage) so streamed and whole answers compare field by field."""
    path = "/v1/chat/completions" if chat else "/v1/completions"
    response = httpx.post(serve.url + path, json={"model": "tiny", "return_token_ids": True, **body}, timeout=120)
    assert response.status_code == 200, response.text
    if not body.get("stream"):
        answer = response.json()
        choice = answer["choices"][0]
        text = choice["message"]["content"] if chat else choice["text"]
        return {"text": text, "token_ids": choice["token_ids"], "finish_reason": choice["finish_reason"],
                "stop_reason": choice["stop_reason"], "logprobs": _logprobs(choice.get("logprobs"), chat),
                "usage": answer["usage"]}
    folded: dict[str, Any] = {"text": "", "token_ids": [], "finish_reason": None, "stop_reason": None, "logprobs": [],
                              "usage": None}
    for data in parse_sse(response.content):
        if data == "[DONE]":
            continue
        event = json.loads(data)
        assert "error" not in event, event
        if event.get("usage"):
            folded["usage"] = event["usage"]
        for choice in event.get("choices", []):
            folded["text"] += (choice.get("delta", {}).get("content") or "") if chat else choice.get("text", "")
            folded["token_ids"] += choice.get("token_ids") or []
            folded["logprobs"] += _logprobs(choice.get("logprobs"), chat)
            folded["finish_reason"] = choice.get("finish_reason") or folded["finish_reason"]
            if choice.get("finish_reason"):
                folded["stop_reason"] = choice["stop_reason"]
    return folded


def _logprobs(logprobs: Any, chat: bool) -> list[Any]:
    """(token, logprob, {alternative: logprob}) per generated token."""
    if not logprobs:
        return []
    if chat:
        return [(e["token"], e["logprob"], {t["token"]: t["logprob"] for t in e["top_logprobs"]})
                for e in logprobs["content"]]
    return [(t, lp, dict(top or {}))
            for t, lp, top in zip(logprobs["tokens"], logprobs["token_logprobs"], logprobs["top_logprobs"] or [])]


def _same_logprobs(pd: list[Any], colocated: list[Any]) -> None:
    """Same tokens and alternatives; values equal up to float noise (the decode computes a token in a
    batch of another shape than colocated's prefill chunk)."""
    assert [(t, sorted(top)) for t, _, top in pd] == [(t, sorted(top)) for t, _, top in colocated]
    for (_, lp, top), (_, lp_c, top_c) in zip(pd, colocated):
        assert lp == pytest.approx(lp_c, abs=1e-3) and top == pytest.approx(top_c, abs=1e-3)


def _same(deployments: dict[str, Serve], body: dict[str, Any], chat: bool = False) -> dict[str, Any]:
    pd, colocated = _ask(deployments["pd"], body, chat), _ask(deployments["colocated"], body, chat)
    for answer in (pd, colocated):  # cached-token details differ by design (the decode loaded the prompt)
        answer["usage"] = {k: answer["usage"][k] for k in ("prompt_tokens", "completion_tokens")}
    _same_logprobs(pd.pop("logprobs"), colocated.pop("logprobs"))
    assert pd == colocated
    return pd


def _stream(body: dict[str, Any]) -> dict[str, Any]:
    return {**body, "stream": True, "stream_options": {"include_usage": True}}


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("sampling", [GREEDY, SEEDED], ids=["greedy", "seeded"])
def test_pd_equals_colocated(deployments: dict[str, Serve], sampling: dict[str, Any], stream: bool) -> None:
    body = {"prompt": PROMPT, "max_tokens": 12, "ignore_eos": True, **sampling}
    answer = _same(deployments, _stream(body) if stream else body)
    assert len(answer["token_ids"]) == 12 and answer["finish_reason"] == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_chat_with_logprobs(deployments: dict[str, Serve], stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6, "logprobs": True,
            "top_logprobs": 2, "ignore_eos": True, **SEEDED}
    answer = _same(deployments, _stream(body) if stream else body, chat=True)
    assert len(answer["token_ids"]) == 6 and _ask(deployments["pd"], body, chat=True)["logprobs"]


@pytest.mark.parametrize("stream", [False, True])
def test_completion_logprobs(deployments: dict[str, Serve], stream: bool) -> None:
    body = {"prompt": PROMPT, "max_tokens": 5, "logprobs": 3, "ignore_eos": True, **GREEDY}
    _same(deployments, _stream(body) if stream else body)
    logprobs = _ask(deployments["pd"], _stream(body) if stream else body)["logprobs"]
    assert len(logprobs) == 5 and all(top for _, _, top in logprobs)  # byte tokens may share a string


@pytest.mark.parametrize("stream", [False, True])
def test_max_tokens_one(deployments: dict[str, Serve], stream: bool) -> None:
    body = {"prompt": PROMPT + " one", "max_tokens": 1, **SEEDED}
    answer = _same(deployments, _stream(body) if stream else body)
    assert len(answer["token_ids"]) == 1 and answer["finish_reason"] == "length"
    _no_blocks_held(deployments["pd"])


@pytest.mark.parametrize("stream", [False, True])
def test_first_token_that_is_a_stop_token_or_string(deployments: dict[str, Serve], stream: bool) -> None:
    base = {"prompt": PROMPT + " stop", "max_tokens": 8, **GREEDY}
    first = _ask(deployments["colocated"], {**base, "max_tokens": 1})
    by_id = _same(deployments, {**(_stream(base) if stream else base), "stop_token_ids": first["token_ids"]})
    assert by_id["token_ids"] == first["token_ids"] and by_id["finish_reason"] == "stop" and by_id["text"] == ""
    assert by_id["stop_reason"] == first["token_ids"][0]
    if first["text"].strip():
        by_text = _same(deployments, {**(_stream(base) if stream else base), "stop": [first["text"].strip()]})
        # Ends at the token whose text completes the stop string (the first, unless its bytes are partial).
        assert by_text["finish_reason"] == "stop" and by_text["token_ids"][:1] == first["token_ids"]
        assert by_text["stop_reason"] == first["text"].strip()
    _no_blocks_held(deployments["pd"])


@pytest.mark.parametrize("stream", [False, True])
def test_min_tokens_holds_the_stop_token_back(deployments: dict[str, Serve], stream: bool) -> None:
    base = {"prompt": PROMPT + " min", "max_tokens": 6, **GREEDY}
    first = _ask(deployments["colocated"], {**base, "max_tokens": 1})
    body = {**base, "min_tokens": 3, "stop_token_ids": first["token_ids"]}
    answer = _same(deployments, _stream(body) if stream else body)
    assert len(answer["token_ids"]) >= 3 and answer["token_ids"][0] != first["token_ids"][0]


def test_decode_continues_from_the_prefill_token(deployments: dict[str, Serve]) -> None:
    """The decode computed no prompt position itself (every one was loaded); the first token was not
    sampled twice."""
    decode = next(url for name, url in deployments["pd"].instance_urls().items() if name.startswith("decode"))
    before = httpx.get(f"{decode}/info", timeout=5).json()
    body = {"prompt": PROMPT + " and one more time, with a longer prompt than before", "max_tokens": 4,
            "ignore_eos": True, **GREEDY}
    _same(deployments, body)
    after = httpx.get(f"{decode}/info", timeout=5).json()
    assert after["stats"]["prompt_tokens_computed"] == before["stats"]["prompt_tokens_computed"], (before, after)
    _no_blocks_held(deployments["pd"])


def _no_blocks_held(serve: Serve) -> None:
    for url in serve.instance_urls().values():
        wait_for(lambda: httpx.get(f"{url}/info", timeout=5).json()["num_blocks_used"] == 0,
                 f"{url} to hold no KV blocks", 10)


def _instance(serve: Serve, role: str) -> str:
    return next(url for name, url in serve.instance_urls().items() if name.startswith(role))


def _prefill_leg(serve: Serve, prompt: str, kv: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 1, "temperature": 0.0, "kv_transfer_params": kv}
    response = httpx.post(_instance(serve, "prefill") + "/v1/completions", json=body, timeout=120)
    assert response.status_code == 200, response.text
    return response.json()["kv_transfer_params"]


def _decode_leg(serve: Serve, prompt: str, kv: dict[str, Any]) -> httpx.Response:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": 6, "temperature": 0.0, "ignore_eos": True,
            "return_token_ids": True, "kv_transfer_params": kv}
    return httpx.post(_instance(serve, "decode") + "/v1/completions", json=body, timeout=120)


def test_vllm_style_legs_without_first_token_still_recompute(deployments: dict[str, Serve]) -> None:
    """vLLM's proxies send {"do_remote_decode": true}: the answer has no first token, and the decode
    recomputes the last prompt token, with the same answer."""
    pd, prompt = deployments["pd"], PROMPT + " as vLLM's toy proxy drives it"
    params = _prefill_leg(pd, prompt, {"do_remote_decode": True})
    assert "first_token_ids" not in params and "first_token_logprobs" not in params
    decode = _instance(pd, "decode")
    before = httpx.get(f"{decode}/info", timeout=5).json()["stats"]["prompt_tokens_computed"]
    response = _decode_leg(pd, prompt, params)
    assert response.status_code == 200, response.text
    after = httpx.get(f"{decode}/info", timeout=5).json()["stats"]["prompt_tokens_computed"]
    assert after == before + 1  # the last prompt token, recomputed
    colocated = _ask(deployments["colocated"], {"prompt": prompt, "max_tokens": 6, "temperature": 0.0,
                                                "ignore_eos": True})
    assert response.json()["choices"][0]["token_ids"] == colocated["token_ids"]
    _no_blocks_held(pd)


def test_forged_first_token_is_refused(deployments: dict[str, Serve]) -> None:
    """A client cannot make the decode continue from a token of its choice: first_token_ids is signed."""
    pd, prompt = deployments["pd"], PROMPT + " with a forged token"
    params = _prefill_leg(pd, prompt, {"do_remote_decode": True, "return_first_token": True})
    assert len(params["first_token_ids"]) == 1
    forged = {**params, "first_token_ids": [(params["first_token_ids"][0] + 1) % 100]}
    unsigned = {k: v for k, v in forged.items() if k != "signature"}
    for bad, field in ((forged, "kv_transfer_params.signature"), (unsigned, "kv_transfer_params.signature")):
        response = _decode_leg(pd, prompt, bad)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["param"] == field
    response = _decode_leg(pd, prompt, params)  # the genuine answer still works, and takes the KV
    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["token_ids"][:1] == params["first_token_ids"]
    _no_blocks_held(pd)


@pytest.mark.parametrize("stream", [False, True])
def test_structured_output_continues_the_grammar_from_the_first_token(deployments: dict[str, Serve],
                                                                       stream: bool) -> None:
    """The decode's grammar replays the prefill's token before it constrains the next one."""
    body = {"prompt": PROMPT + " json", "max_tokens": 12, "guided_regex": "(yes|no|maybe)-[0-9]{3}", **SEEDED}
    answer = _same(deployments, _stream(body) if stream else body)
    assert answer["finish_reason"] == "stop" and answer["text"].split("-")[0] in ("yes", "no", "maybe")


@pytest.mark.parametrize("stream", [False, True])
def test_several_samples_keep_the_recompute_path(deployments: dict[str, Serve], stream: bool) -> None:
    body = {"prompt": PROMPT + " n", "max_tokens": 5, "n": 3, "ignore_eos": True, **SEEDED}
    path = "/v1/completions"
    answers = []
    for serve in (deployments["pd"], deployments["colocated"]):
        response = httpx.post(serve.url + path, json={"model": "tiny", **body, "stream": stream}, timeout=120)
        assert response.status_code == 200, response.text
        if stream:
            texts = ["", "", ""]
            for data in parse_sse(response.content):
                if data != "[DONE]":
                    for choice in json.loads(data)["choices"]:
                        texts[choice["index"]] += choice.get("text", "")
        else:
            texts = [c["text"] for c in sorted(response.json()["choices"], key=lambda c: c["index"])]
        answers.append(texts)
    assert answers[0] == answers[1]
