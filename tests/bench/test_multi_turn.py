"""`pdlaunch bench serve --multi-turn` against a fake server that answers with token ids and serves the two
counters the run reads: each turn resends the conversation (shared system prompt, earlier turns and the
server's own answer ids) plus new tokens, and the per-request figures are the counters' deltas."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import PlainTextResponse, StreamingResponse
from typer.testing import CliRunner

from pdlaunch.bench.cli import bench_app
from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer

ANSWER = 3  # tokens per answer


class _Server:
    def __init__(self) -> None:
        self.prompts: list[list[int]] = []
        self.asked: dict[int, list[int]] = {}  # prompt length -> the max_tokens each request of that length asked
        self.answers: dict[tuple[int, ...], list[int]] = {}  # prompt -> the answer's token ids
        self.chats: list[list[dict[str, str]]] = []
        self.computed, self.moved = 1000.0, 5.0
        self.app = FastAPI()
        self.app.get("/v1/models")(lambda: {"data": [{"id": "m"}]})
        self.app.get("/metrics")(self.metrics)
        self.app.post("/v1/completions")(self.completions)
        self.app.post("/v1/chat/completions")(self.completions)

    async def metrics(self) -> PlainTextResponse:
        return PlainTextResponse(f"# TYPE pdlaunch_prompt_tokens_computed counter\n"
                                 f'pdlaunch_prompt_tokens_computed_total{{instance="p"}} {self.computed}\n'
                                 f"# TYPE pdlaunch_kv_transfer_bytes counter\n"
                                 f'pdlaunch_kv_transfer_bytes_total{{instance="d"}} {self.moved}\n')

    async def completions(self, request: Request) -> Any:
        body = await request.json()
        chat = "messages" in body
        if chat:
            self.chats.append(body["messages"])
        else:
            assert body["return_token_ids"] is True
            self.prompts.append(body["prompt"])
        self.computed += 10
        self.moved += 100
        start = len(self.prompts) * 1000
        tokens = body.get("max_tokens") or body["max_completion_tokens"]  # as asked (ignore_eos)
        if not chat:
            self.answers[tuple(body["prompt"])] = [start + i for i in range(tokens)]
            self.asked.setdefault(len(body["prompt"]), []).append(tokens)

        async def events() -> AsyncIterator[bytes]:
            for i in range(tokens):
                choice: dict[str, Any] = {"index": 0, "finish_reason": None}
                if chat:
                    choice["delta"] = {"content": f"w{start + i} "}
                else:
                    choice.update(text=f"w{i}", token_ids=[start + i])
                yield f"data: {json.dumps({'choices': [choice]})}\n\n".encode()
            yield b"data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")


def _run(url: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    return dict(_run_doc(url, tmp_path, *extra)["multi_turn"])


def _run_doc(url: str, tmp_path: Path, *extra: str) -> dict[str, Any]:
    out = tmp_path / "mt.json"
    conversations = [] if "--num-conversations" in extra else ["--num-conversations", "2"]  # each flag given once
    result = CliRunner().invoke(bench_app, ["serve", "--base-url", url, "--multi-turn", *conversations,
                                            "--num-turns", "3", "--system-prompt-len", "5", "--random-input-len", "2",
                                            "--random-output-len", str(ANSWER), "--result-filename", str(out), *extra])
    assert result.exit_code == 0, result.output
    assert "Prompt tokens computed" in result.output and "TTFT p50" in result.output
    return dict(json.loads(out.read_text()))


def test_each_turn_resends_the_conversation_with_the_servers_answer(tmp_path: Path) -> None:
    server = _Server()
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        summary = _run(fake.url, tmp_path)
    # 2 conversations x 3 turns: 5 system tokens + 2 per user turn + 3 per answer
    assert sorted(len(p) for p in server.prompts) == [7, 7, 12, 12, 17, 17]
    assert len({tuple(p[:5]) for p in server.prompts}) == 1  # one system prompt for all
    for prompt in (p for p in server.prompts if len(p) > 7):
        earlier = [e for e in server.prompts if len(e) == len(prompt) - ANSWER - 2 and prompt[:len(e)] == e]
        assert len(earlier) == 1  # the previous turn's prompt, then its answer's ids, then new tokens
        assert prompt[len(earlier[0]):len(earlier[0]) + ANSWER] == server.answers[tuple(earlier[0])]
    assert summary == {"conversations": 2, "turns": 3, "requests": 6, "prompt_tokens_computed_per_request": 10.0,
                       "kv_bytes_moved_per_request": 100.0, "ttft_p50_ms": summary["ttft_p50_ms"]}


def test_the_last_answer_is_asked_for_last_answer_len_tokens(tmp_path: Path) -> None:
    """--last-answer-len 1: each conversation's third (last) turn asks for 1 token, the others for --random-output-len
    (ANSWER); every prompt is the same as without the flag, and the JSON says it. Without it every turn asks ANSWER
    and the JSON has no such key (a user's default output is unchanged)."""
    server = _Server()
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        doc = _run_doc(fake.url, tmp_path, "--last-answer-len", "1")
    assert server.asked == {7: [ANSWER] * 2, 12: [ANSWER] * 2, 17: [1, 1]}  # 5 system + 2 a turn + ANSWER an answer
    assert doc["last_answer_len"] == 1 and doc["answer_len"] == ANSWER
    assert doc["output_lens"] == [ANSWER, ANSWER, 1] * 2 and doc["multi_turn"]["requests"] == 6
    server = _Server()
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        doc = _run_doc(fake.url, tmp_path)
    assert server.asked == {7: [ANSWER] * 2, 12: [ANSWER] * 2, 17: [ANSWER] * 2}
    assert "last_answer_len" not in doc and doc["output_lens"] == [ANSWER] * 6


def test_conversations_start_at_the_request_rate(tmp_path: Path) -> None:
    """--request-rate 5 with near-regular gaps (--burstiness 1000): the 3 conversations start ~0.2 s apart,
    each one's turns back to back; without it all start at once (the previous test)."""
    server = _Server()
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        doc = _run_doc(fake.url, tmp_path, "--num-conversations", "3", "--request-rate", "5", "--burstiness", "1000")
    assert doc["conversation_rate"] == 5.0 and doc["multi_turn"]["requests"] == 9
    firsts = sorted(doc["start_times"][::3])  # results are per conversation, its 3 turns in order
    # a conversation never starts before its arrival (0, ~0.2, ~0.4 s): lower bounds only, for a loaded machine
    assert firsts[1] >= 0.15 and firsts[2] >= 0.35, firsts
    assert len(server.prompts) == 9 and len({tuple(p[:5]) for p in server.prompts}) == 1


def test_chat_turns_carry_the_answers_as_assistant_messages(tmp_path: Path) -> None:
    server = _Server()
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        _run(fake.url, tmp_path, "--endpoint", "/v1/chat/completions")
    longest = max(server.chats, key=len)
    assert [m["role"] for m in longest] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert longest[2]["content"].startswith("w")


def test_flags_of_the_other_mode_are_refused_not_ignored() -> None:
    url = ["serve", "--base-url", "http://127.0.0.1:9"]
    for extra, named in ((["--multi-turn", "--num-prompts", "5"], "--num-prompts"),
                         (["--multi-turn", "--max-concurrency", "2"], "--max-concurrency"),
                         (["--multi-turn", "--prompt-format", "words"], "--prompt-format words"),
                         (["--num-turns", "3"], "--num-turns"),
                         (["--last-answer-len", "8"], "--last-answer-len")):
        result = CliRunner().invoke(bench_app, [*url, *extra])
        assert result.exit_code == 1, (extra, result.output)
        assert named in result.output and "--multi-turn" in result.output, result.output


def test_a_metrics_page_that_is_not_prometheus_text_reports_nothing_exported(tmp_path: Path) -> None:
    server = _Server()

    async def html() -> PlainTextResponse:
        return PlainTextResponse("<html><body>dashboard</body></html>\n")

    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", "") != "/metrics"]
    server.app.get("/metrics")(html)
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        summary = _run(fake.url, tmp_path)
    assert summary["prompt_tokens_computed_per_request"] is None and summary["kv_bytes_moved_per_request"] is None


def test_a_metrics_read_that_failed_before_the_run_reports_no_delta(tmp_path: Path) -> None:
    """The read before the run failed (a 503 here) and the one after did not: the "delta" was the after-run totals
    themselves, everything counted since the deployment started (here 177 tokens a request, not the run's 10)."""
    server = _Server()
    reads = [0]

    async def unavailable_first() -> Any:
        reads[0] += 1
        if reads[0] == 1:
            return PlainTextResponse("busy\n", status_code=503)
        return await server.metrics()

    server.app.router.routes = [r for r in server.app.router.routes if getattr(r, "path", "") != "/metrics"]
    server.app.get("/metrics")(unavailable_first)
    out = tmp_path / "mt.json"
    with ThreadServer(server.app, PortAllocator("127.0.0.1").free("fake")) as fake:
        result = CliRunner().invoke(bench_app, ["serve", "--base-url", fake.url, "--multi-turn", "--num-conversations",
                                                "2", "--num-turns", "3", "--system-prompt-len", "5",
                                                "--random-input-len", "2", "--random-output-len", str(ANSWER),
                                                "--result-filename", str(out)])
    assert result.exit_code == 0, result.output
    assert reads[0] == 2
    summary = json.loads(out.read_text())["multi_turn"]
    assert summary["prompt_tokens_computed_per_request"] is None and summary["kv_bytes_moved_per_request"] is None
    # exported, but not read: not the "not exported" of a server without the counters
    text = " ".join(result.output.split())
    assert "Prompt tokens computed │ n/a (/metrics could not be read)" in text, text
    assert "not exported" not in text
