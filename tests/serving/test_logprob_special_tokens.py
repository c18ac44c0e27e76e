"""A special token's logprob entry names it, through a real instance's HTTP API (tiny model, CPU, in this process).

With skip_special_tokens true (the default) a sampled EOS had the token text "" in its logprobs (completions'
`tokens`, chat's `token` and `bytes`), and so did every special token among the top_logprobs: two of them in a
completions position were one key "" of its dict, one entry lost. vLLM decodes each logprob token alone with its
tokenizer's default, which keeps special tokens (vllm/tokenizers/detokenizer_utils.convert_ids_list_to_tokens), so
the EOS reads "<|end_of_text|>" there whatever skip_special_tokens says; the choice's text still leaves it out.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from pdlaunch.http.sse import parse_sse
from pdlaunch.model.demo_tokenizer import BOS_TOKEN, BOS_TOKEN_ID, EOS_TOKEN, EOS_TOKEN_ID
from tests.serving.helpers import in_process_instance, tiny_colocated

TIMEOUT = 120.0  # a loaded 2-core machine
# The grammar (any number of BOS tokens) masks every token but the BOS and the EOS (it is complete from the start), so
# these two are a position's top 2 logprobs (logprobs come after the grammar's mask, before logit_bias); the bias has
# the EOS sampled at once, which ends the request.
STEER = {"model": "tiny", "temperature": 0.0, "max_tokens": 4, "logit_bias": {str(EOS_TOKEN_ID): 100},
         "structured_outputs": {"grammar": f"start: <[{BOS_TOKEN_ID}]>*"}}
SKIP = [{}, {"skip_special_tokens": True}, {"skip_special_tokens": False}]
SKIP_IDS = ["default", "skip", "keep"]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with in_process_instance(tiny_colocated(256), "logprob-specials-0") as (address, _):
        yield address


def _choices(url: str, path: str, body: dict[str, Any], stream: bool) -> list[dict[str, Any]]:
    """The first choice of an answer, or of each chunk of a stream that has one."""
    answer = httpx.post(f"{url}{path}", json={**STEER, **body, "stream": stream}, timeout=TIMEOUT)
    assert answer.status_code == 200, answer.text
    if not stream:
        return [answer.json()["choices"][0]]
    return [c["choices"][0] for c in (json.loads(e) for e in parse_sse(answer.content)[:-1]) if c["choices"]]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("skip", SKIP, ids=SKIP_IDS)
def test_completions_logprobs_name_a_sampled_eos_and_special_alternatives(url: str, skip: dict[str, Any],
                                                                          stream: bool) -> None:
    choices = _choices(url, "/v1/completions", {"prompt": "hi", "logprobs": 2, **skip}, stream)
    tokens = [t for c in choices for t in (c["logprobs"] or {}).get("tokens", [])]
    top = [t for c in choices for t in (c["logprobs"] or {}).get("top_logprobs", [])]
    token_logprobs = [t for c in choices for t in (c["logprobs"] or {}).get("token_logprobs", [])]
    assert "".join(c["text"] for c in choices) == "" and choices[-1]["finish_reason"] == "stop", choices
    assert tokens == [EOS_TOKEN], choices
    assert sorted(top[0]) == [BOS_TOKEN, EOS_TOKEN] and top[0][EOS_TOKEN] == token_logprobs[0], top  # "" and "": one
    assert -9999.0 < top[0][BOS_TOKEN] < 0.0, top


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("skip", SKIP, ids=SKIP_IDS)
def test_chat_logprobs_name_a_sampled_eos_and_special_alternatives(url: str, skip: dict[str, Any],
                                                                   stream: bool) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2, **skip}
    choices = _choices(url, "/v1/chat/completions", body, stream)
    content = [e for c in choices for e in (c.get("logprobs") or {}).get("content") or []]
    assert len(content) == 1 and choices[-1]["finish_reason"] == "stop", choices
    eos = content[0]
    assert (eos["token"], eos["bytes"]) == (EOS_TOKEN, list(EOS_TOKEN.encode())), eos
    assert sorted((t["token"], t["bytes"]) for t in eos["top_logprobs"]) == [
        (BOS_TOKEN, list(BOS_TOKEN.encode())), (EOS_TOKEN, list(EOS_TOKEN.encode()))], eos
    assert {t["token"]: t["logprob"] for t in eos["top_logprobs"]}[EOS_TOKEN] == eos["logprob"], eos
