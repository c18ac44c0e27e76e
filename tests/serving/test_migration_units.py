"""Request migration's pieces: what can migrate, the continuation request (proxy/continuation.py), and the
rewriting of a continuation's chunks into the client's stream (proxy/stream_progress.py); per-request
disaggregation's count and settings (proxy/disaggregate.py)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import StreamingResponse

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.deployment import Deployment
from pdlaunch.launcher.ports import PortAllocator
from pdlaunch.model.demo import resolve_model_path
from pdlaunch.model.tokenizer import Tokenizer
from pdlaunch.proxy.__main__ import parse_args
from pdlaunch.proxy.app import build_proxy_app
from pdlaunch.proxy.continuation import continuation_body, not_migratable
from pdlaunch.proxy.disaggregate import DECODE_ONLY, PD, Disaggregation
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.stream_progress import Progress
from pdlaunch.server.request_fields import DEFAULT_MAX_TOKENS
from tests.config.cli_helpers import assert_invalid, check
from tests.helpers.fake_instances import FakeInstance
from tests.helpers.stalling_instance import StallingInstance
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_hardening import SECRET, Prefill


def _chunk(text: str, ids: list[int], finish: str | None = None, **top: Any) -> dict[str, Any]:
    return {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m",
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None, "token_ids": ids}],
            **top}


@pytest.mark.parametrize(("body", "why"), [
    ({"stop": ["\n"]}, "stop"), ({"tools": [{}]}, "tools"), ({"tool_choice": "required"}, "tool_choice"),
    ({"response_format": {"type": "json_object"}}, "response_format"), ({"guided_regex": "a+"}, "guided_regex"),
    ({"presence_penalty": 0.5}, "presence_penalty"), ({"frequency_penalty": -1}, "frequency_penalty"),
    ({"bad_words": ["two tokens"]}, "bad_words"), ({"logprobs": True}, "logprobs"), ({"logprobs": 0}, "logprobs"),
    ({"n": 2}, "n"), ({"best_of": 2}, "best_of"), ({"echo": True}, "echo"),
])
def test_requests_whose_output_needs_more_than_token_ids_do_not_migrate(body: dict[str, Any], why: str) -> None:
    assert not_migratable(body, chat=True) == why
    # A repetition penalty counts prompt and output tokens: the continuation's prompt carries the output so far.
    assert not_migratable({"max_tokens": 5, "temperature": 0, "seed": 3, "repetition_penalty": 1.2,
                           "logprobs": False, "top_logprobs": 0, "bad_words": [], "response_format": {"type": "text"}},
                          True) is None
    # tool_choice "none": the tools only reach the template (the prompt's ids); the output is plain content.
    tools = [{"type": "function", "function": {"name": "f"}}]
    assert not_migratable({"tools": tools, "tool_choice": "none"}, chat=True) is None
    assert not_migratable({"tools": [], "tool_choice": "auto"}, chat=True) == "tool_choice"


def test_continuation_goes_on_from_the_ids_with_what_is_left_of_the_limits() -> None:
    body = {"messages": [], "max_completion_tokens": 10, "min_tokens": 4, "temperature": 0, "model": "m",
            "tools": None}
    leg = continuation_body(body, chat=True, token_ids=[1, 2, 3, 9], generated=1)
    assert leg == {"model": "m", "temperature": 0, "prompt": [1, 2, 3, 9], "max_tokens": 9, "min_tokens": 3,
                   "stream": True, "return_token_ids": True}
    assert continuation_body({}, chat=False, token_ids=[1], generated=2)["max_tokens"] == DEFAULT_MAX_TOKENS - 2
    # min_completion_tokens is no field the instances read (they ignore it): the continuation does not start to.
    assert "min_tokens" not in continuation_body({"min_completion_tokens": 4}, chat=True, token_ids=[1], generated=1)
    kept = {"repetition_penalty": 1.3, "include_stop_str_in_output": True, "stop_token_ids": [7]}
    assert continuation_body(kept, chat=False, token_ids=[1], generated=1).items() >= kept.items()


def test_ids_after_the_last_text_are_made_again_and_not_shown_twice() -> None:
    progress = Progress(chat=False, client_ids=True)
    first = progress.rewrite(_chunk("a", [5], prompt_token_ids=None) | {"choices": [
        {"index": 0, "text": "a", "finish_reason": None, "token_ids": [5], "prompt_token_ids": [1, 2]}]}, False)
    assert first is not None and progress.prompt_ids == [1, 2]
    # held back: a character not complete yet; its id waits for its text (nothing else for the client)
    assert progress.rewrite(_chunk("", [6]), False) is None
    assert (progress.ids, progress.committed) == ([5, 6], 1)
    # The migration: the new decode starts from [1, 2, 5] and makes 6 again.
    progress.offset = progress.committed
    del progress.ids[progress.committed:]
    again = progress.rewrite(_chunk("é", [6, 7], usage={"prompt_tokens": 3, "completion_tokens": 2}), True)
    assert again is not None
    assert again["id"] == "cmpl-x" and again["choices"][0]["token_ids"] == [6, 7]
    assert progress.ids == [5, 6, 7]
    assert again["usage"]["prompt_tokens"] == 2 and again["usage"]["completion_tokens"] == 3


def test_a_chat_stream_gets_chat_deltas_and_no_ids_it_did_not_ask_for() -> None:
    progress = Progress(chat=True, client_ids=False)
    first = progress.rewrite({"id": "chatcmpl-y", "object": "chat.completion.chunk", "created": 2, "model": "m",
                              "prompt_token_ids": [1], "choices": [{"index": 0, "delta": {"role": "assistant",
                                                                    "content": "Hi"}, "token_ids": [4]}]}, False)
    assert first is not None and "prompt_token_ids" not in first and "token_ids" not in first["choices"][0]
    assert progress.rewrite(_chunk("", [8]), True) is None  # only ids: nothing for this client
    stopped = _chunk(" there", [9], finish="stop")
    stopped["choices"][0]["stop_reason"] = "."  # the stop string that ended it, as the decode's chunk names it
    last = progress.rewrite(stopped, True)
    assert last == {"id": "chatcmpl-y", "object": "chat.completion.chunk", "created": 2, "model": "m",
                    "choices": [{"index": 0, "delta": {"content": " there"}, "finish_reason": "stop",
                                 "stop_reason": ".", "logprobs": None}]}
    assert progress.finished


def test_the_proxy_refuses_a_negative_migration_limit() -> None:
    with pytest.raises(SystemExit):
        parse_args(["--prefill", "http://a:1", "--decode", "http://b:2", "--migration-limit", "-1"])
    assert parse_args(["--prefill", "http://a:1", "--decode", "http://b:2"]).migration_limit == 3


def test_the_launcher_hands_the_proxy_its_migration_limit_and_check_config_refuses_a_bad_one(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"},
                                           "proxy": {"port": 0, "migration_limit": 0}})
    argv = Deployment(cfg, log_dir=tmp_path)._proxy_argv()  # noqa: SLF001
    assert parse_args(argv[3:]).migration_limit == 0
    config = tmp_path / "c.yaml"
    config.write_text("proxy: {migration_limit: -1}\n")
    assert_invalid(check([str(config), "--model", "tiny", "--device", "cpu"]), "proxy.migration_limit")


def test_disaggregation_counts_prompt_tokens_as_the_instances_do() -> None:
    tiny = resolve_model_path("tiny")
    tokenizer, decider = Tokenizer(tiny), Disaggregation(8, tiny)
    prompt = "one two three four five six seven eight nine ten"
    assert decider.prompt_tokens({"prompt": prompt}, chat=False) == len(tokenizer.encode(prompt))
    assert asyncio.run(decider.decide({"prompt": [1, 2, 3]}, chat=False)) == (DECODE_ONLY, 3)
    assert asyncio.run(decider.decide({"prompt": prompt}, chat=False))[0] == PD
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert decider.prompt_tokens(chat, chat=True) > 1  # the chat template's tokens count too
    assert asyncio.run(Disaggregation(None, None).decide({"prompt": "x"}, chat=False)) == (PD, None)


def test_disaggregate_min_tokens_from_the_flag_to_the_proxy(tmp_path: Path) -> None:
    cfg = DeploymentConfig.model_validate({"device": "cpu", "model": {"path": "tiny"},
                                           "proxy": {"port": 0, "disaggregate_min_tokens": 256}})
    args = parse_args(Deployment(cfg, log_dir=tmp_path)._proxy_argv()[3:])  # noqa: SLF001
    assert (args.disaggregate_min_tokens, args.tokenizer) == (256, resolve_model_path("tiny"))
    assert_invalid(check(["--model", "tiny", "--device", "cpu", "--disaggregate-min-tokens", "0"]),
                   "--disaggregate-min-tokens", "must be >= 1")
    result = check(["--model", "tiny", "--device", "cpu", "--colocated", "--disaggregate-min-tokens", "8"])
    assert result.exit_code == 1 and "never disaggregates" in result.output, result.output
    with pytest.raises(SystemExit):  # without a tokenizer the proxy cannot count
        parse_args(["--prefill", "http://a:1", "--decode", "http://b:2", "--disaggregate-min-tokens", "256"])


class _EndingDecode:
    """Streams one chunk (text, its id; the prompt's ids for a text prompt) and ends without [DONE]."""

    def __init__(self, bodies: list[dict[str, Any]]) -> None:
        self.bodies = bodies
        self.app = FastAPI()
        self.app.get("/health")(lambda: {"status": "ok"})
        self.app.post("/v1/completions")(self.completions)

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        continued = isinstance(body["prompt"], list)
        choice = {"index": 0, "text": "B" if continued else "A", "finish_reason": None,
                  "token_ids": [len(body["prompt"]) + 5]}
        if not continued:
            choice["prompt_token_ids"] = [1, 2]
        chunk = {"id": "cmpl-z", "object": "text_completion", "created": 1, "model": "m", "choices": [choice]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk)}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


@contextmanager
def _proxy_over_two_decodes(d0: FastAPI, d1: FastAPI) -> Iterator[tuple[str, InstancePool]]:
    """A proxy (migration_limit 2) over one prefill and the decodes `d0` and `d1`, once it sees all three: its URL and
    pool."""
    ports = PortAllocator("127.0.0.1")
    with ThreadServer(Prefill().app, ports.free("prefill")) as p, ThreadServer(d0, ports.free("d0")) as s0, \
            ThreadServer(d1, ports.free("d1")) as s1:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", s0.url, "decode-0"),
                             Instance("decode", s1.url, "decode-1")])
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=2)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see all three")
            yield proxy.url, pool


def test_after_migration_limit_moves_the_stream_ends_with_a_migration_limit_event() -> None:
    bodies: list[Any] = []
    with _proxy_over_two_decodes(_EndingDecode(bodies).app, _EndingDecode(bodies).app) as (url, _):
        text = httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 10, "stream": True},
                          timeout=30).text
        metrics = httpx.get(f"{url}/metrics", timeout=10).text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["A", "B", "B"]
    assert all(e["id"] == "cmpl-z" and "token_ids" not in e["choices"][0] for e in events[:-1])
    assert events[-1]["error"]["code"] == "migration_limit" and "after 2 migrations" in events[-1]["error"]["message"]
    assert bodies[0]["return_token_ids"] is True and "kv_transfer_params" in bodies[0]
    assert [(b["prompt"], b["max_tokens"]) for b in bodies[1:]] == [([1, 2, 7], 9), ([1, 2, 7, 8], 8)]
    assert 'pdlaunch_proxy_migrations_total{reason="died"} 2.0' in metrics
    assert "pdlaunch_proxy_migrations_exhausted_total 1.0" in metrics


class _StallingDecode(StallingInstance):
    """Takes a whole (not streamed) decode leg and never answers it; its /health stops answering too."""

    async def completions(self, request: Request) -> Any:
        await self.stall()
        return {}


class _AnsweringDecode(FakeInstance):
    async def completions(self, request: Request) -> Any:
        await self.body(request)
        return {"id": "cmpl-a", "choices": [{"index": 0, "text": "done", "finish_reason": "length"}]}


def test_a_whole_answer_migrated_off_a_stalled_decode_releases_the_prefills_held_kv() -> None:
    """The new decode computes the prompt itself (no kv_transfer_params): the KV the prefill holds for the
    stalled decode is released at once, not left to its lease."""
    ports, prefill, answering = PortAllocator("127.0.0.1"), Prefill(), _AnsweringDecode()
    with ThreadServer(prefill.app, ports.free("prefill")) as p, \
            ThreadServer(_StallingDecode().app, ports.free("d0")) as d0, \
            ThreadServer(answering.app, ports.free("d1")) as d1:
        pool = InstancePool([Instance("prefill", p.url, "prefill-0"), Instance("decode", d0.url, "decode-0"),
                             Instance("decode", d1.url, "decode-1")], health_timeout_s=0.5)
        app = build_proxy_app(pool, 60.0, deployment_secret=SECRET, migration_limit=1)
        with ThreadServer(app, ports.free("proxy")) as proxy:
            wait_for(lambda: httpx.get(f"{proxy.url}/health").status_code == 200, "the proxy to see all three")
            pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # decode-0 first
            answer = httpx.post(f"{proxy.url}/v1/completions", json={"prompt": "go", "max_tokens": 4}, timeout=30)
            assert answer.status_code == 200, answer.text
            assert "kv_transfer_params" not in answering.bodies[-1]
            wait_for(lambda: prefill.released == prefill.legs, "the prefill's held KV to be released", 10.0)


def test_disaggregate_max_itl_ms_is_checked_as_the_user_typed_it() -> None:
    base = ["--model", "tiny", "--device", "cpu"]
    assert_invalid(check([*base, "--disaggregate-min-tokens", "8", "--disaggregate-max-itl-ms", "0"]),
                   "--disaggregate-max-itl-ms", "must be > 0.0")
    assert_invalid(check([*base, "--disaggregate-max-itl-ms", "9"]), "--disaggregate-max-itl-ms",
                   "disaggregate_min_tokens is not set")
    result = check([*base, "--colocated", "--disaggregate-min-tokens", "8", "--disaggregate-max-itl-ms", "9"])
    assert result.exit_code == 1 and "never disaggregates" in result.output, result.output
    assert check([*base, "--disaggregate-min-tokens", "8", "--disaggregate-max-itl-ms", "8.5"]).exit_code == 0


def test_a_chunk_with_text_and_several_ids_leaves_the_stream_unsure_until_one_id_brings_text() -> None:
    """A foreign (vLLM) decode sends a step's ids in one chunk (speculative decoding, a stream interval); its
    detokenizer holds back the ids of a character not complete yet, so such a chunk's text may not cover its last
    ids. Counting them delivered would skip their text in a continuation: the proxy cannot tell, and says so."""
    progress = Progress(chat=False, client_ids=False)
    progress.rewrite(_chunk("a", [5]) | {"prompt_token_ids": [1, 2]}, False)
    assert (progress.committed, progress.bundled) == (1, 0)
    progress.rewrite(_chunk("b", [6, 7]), False)  # 7 may be the first byte of a character not shown yet
    assert progress.bundled == 2
    progress.rewrite(_chunk("", [8, 9]), False)  # nothing shown: still unsure
    assert progress.bundled == 2
    progress.rewrite(_chunk("é", [10]), False)  # one id's text: every id so far is consumed
    assert (progress.committed, progress.bundled) == (6, 0)
    progress.rewrite(_chunk("", [11, 12]), False)  # ids only: made again by a continuation, as ever
    assert (progress.committed, progress.bundled) == (6, 0)
    progress.rewrite(_chunk("cd", [13, 14], finish="length"), False)  # the last chunk: nothing held back
    assert (progress.committed, progress.bundled, progress.finished) == (10, 0, True)


class _BundlingDecode(_EndingDecode):
    """Streams one chunk of two ids whose text is the first's alone (the second's, a character's first byte, held
    back), as a vLLM decode with speculative decoding may, and ends without [DONE]."""

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        self.bodies.append(body)
        chunk = {"id": "cmpl-v", "object": "text_completion", "created": 1, "model": "m", "choices": [
            {"index": 0, "text": "A", "finish_reason": None, "token_ids": [30, 31], "prompt_token_ids": [1, 2]}]}

        async def events() -> AsyncIterator[bytes]:
            yield f"data: {json.dumps(chunk)}\n\n".encode()

        return StreamingResponse(events(), media_type="text/event-stream")


def test_a_stream_whose_last_text_chunk_bundled_several_ids_is_not_continued_past_a_held_back_one() -> None:
    """The continuation would start after id 31, whose text the client never got (a character lost): the stream
    ends with the error event saying why, and no continuation is sent."""
    bodies: list[Any] = []
    with _proxy_over_two_decodes(_BundlingDecode(bodies).app, _EndingDecode(bodies).app) as (url, pool):
        pool.policy.choose = lambda role, ready: ready[0]  # type: ignore[method-assign]  # decode-0 first
        text = httpx.post(f"{url}/v1/completions", json={"prompt": "go", "max_tokens": 10, "stream": True},
                          timeout=30).text
    assert text.endswith("data: [DONE]\n\n"), text[-200:]
    events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
    assert [e["choices"][0]["text"] for e in events[:-1]] == ["A"]
    error = events[-1]["error"]
    assert error["code"] == "instance_failed" and "carried 2 token ids at once" in error["message"] and \
        "not migrated" in error["message"], error
    assert len(bodies) == 1 and bodies[0]["return_token_ids"] is True  # no continuation went out
