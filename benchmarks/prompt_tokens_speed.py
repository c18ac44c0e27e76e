"""What the proxy spends on one request's prompt on the prefix-routing / per-request-PD path, turn by turn of
multi-turn conversations shaped as `pdlaunch bench serve --multi-turn` sends them.

    python benchmarks/prompt_tokens_speed.py [--model tiny] [--conversations 16] [--turns 4] [--system-len 1024]
        [--user-len 64] [--answer-len 256] [--block-size 16] [--json OUT]

Per request, on an asyncio event loop as the proxy runs it, each timed alone:
- parse: the client body's parse and validation (translate.parse_client_body, before any routing);
- prompt: the prompt's token ids and their block hashes (PrefixRouter.prompt, then PromptBlocks.hashes at
  --block-size): validation again, the chat template, the tokenizer, the hand-over to a worker thread and back
  when the proxy makes one; this is what the request waits for before the proxy picks its instances;
- encode, hashes: the tokenizer's encode of the whole templated text and the block hashes alone (no thread).

Two workloads, every conversation with the same system prompt, as the bench's: chat (/v1/chat/completions: a
system message of --system-len words, each turn a user message of --user-len words, each answer an assistant
message of --answer-len words, as the bench's chat mode resends the answer's text) and completions (token ids:
--system-len ids, then --user-len and --answer-len ids a turn, as the bench's default /v1/completions mode resends
the server's own ids; the proxy never tokenizes those).
The conversations run one after another, each turn after the previous one, as the bench's turns reach the proxy;
figures are medians over the conversations per turn. To compare trees, run the script with another tree's
package first on PYTHONPATH (it uses only what both trees have).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from pdlaunch.model.demo import resolve_model_path
from pdlaunch.proxy.disaggregate import PromptTokens
from pdlaunch.proxy.prefix import PrefixRouter
from pdlaunch.proxy.translate import parse_client_body
from pdlaunch.server.chat_request import ChatCompletionRequest
from pdlaunch.server.chat_template import render

WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def conversation_bodies(args: argparse.Namespace, rng: np.random.Generator, chat: bool,
                        system: tuple[str, list[int]]) -> list[dict[str, Any]]:
    """One conversation's requests, turn by turn: each resends the whole conversation so far, after the system
    prompt that every conversation shares (`system`: as words, as ids)."""
    def words(n: int) -> str:
        return " ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n).tolist())

    def ids(n: int) -> list[int]:
        return [int(t) for t in rng.integers(100, 30_000, n).tolist()]

    base: dict[str, Any] = {"model": "tiny", "max_tokens": args.answer_len, "stream": True}
    bodies = []
    messages: list[dict[str, str]] = [{"role": "system", "content": system[0]}]
    prompt = list(system[1])
    for _ in range(args.turns):
        if chat:
            messages.append({"role": "user", "content": words(args.user_len)})
            bodies.append({**base, "messages": list(messages)})
            messages.append({"role": "assistant", "content": words(args.answer_len)})
        else:
            prompt += ids(args.user_len)
            bodies.append({**base, "prompt": list(prompt)})
            prompt += ids(args.answer_len)
    return bodies


def system_prompt(args: argparse.Namespace, rng: np.random.Generator) -> tuple[str, list[int]]:
    return (" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), args.system_len).tolist()),
            [int(t) for t in rng.integers(100, 30_000, args.system_len).tolist()])


def ms(seconds: list[float]) -> float:
    return statistics.median(seconds) * 1e3


async def run(args: argparse.Namespace, chat: bool, tokenizer_dir: Path) -> list[dict[str, Any]]:
    tokens = PromptTokens(tokenizer_dir)
    router = PrefixRouter(None, None, tokens, by_prefix=False)  # type: ignore[arg-type] # prompt() needs no pool
    rng = np.random.default_rng(args.seed)
    other = np.random.default_rng(args.seed + 1)
    warm = conversation_bodies(args, other, chat, system_prompt(args, other))[0]
    await router.prompt(warm, chat)  # first-use paths (the template's compile), another system prompt
    system = system_prompt(args, rng)
    conversations = [conversation_bodies(args, rng, chat, system) for _ in range(args.conversations)]
    times: list[dict[str, list[float]]] = [{"parse": [], "prompt": [], "encode": [], "hashes": []}
                                           for _ in range(args.turns)]
    sizes: list[tuple[int, int]] = []
    for bodies in conversations:
        for turn, body in enumerate(bodies):
            raw = json.dumps(body).encode()
            start = time.perf_counter()
            parse_client_body(raw, chat)
            parsed = time.perf_counter()
            prompt = await router.prompt(body, chat)
            assert prompt is not None
            prompt.hashes(args.block_size)
            done = time.perf_counter()
            times[turn]["parse"].append(parsed - start)
            times[turn]["prompt"].append(done - parsed)
            if chat:
                request = ChatCompletionRequest.model_validate(body).template_messages()
                text = render(tokens._tokenizer, request)
                start = time.perf_counter()
                tokens._tokenizer.encode(text, add_special_tokens=request.add_special_tokens)
                times[turn]["encode"].append(time.perf_counter() - start)
            fresh = type(prompt)(prompt.token_ids)
            start = time.perf_counter()
            fresh.hashes(args.block_size)
            times[turn]["hashes"].append(time.perf_counter() - start)
            if len(sizes) <= turn:
                sizes.append((len(raw), len(prompt.token_ids)))
    return [{"turn": turn + 1, "body_bytes": sizes[turn][0], "prompt_tokens": sizes[turn][1],
             **{f"{stage}_ms": ms(values) if values else None for stage, values in times[turn].items()}}
            for turn in range(args.turns)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny", help="a checkpoint whose tokenizer the proxy loads")
    parser.add_argument("--conversations", type=int, default=16)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--user-len", type=int, default=64)
    parser.add_argument("--answer-len", type=int, default=256)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    tokenizer_dir = resolve_model_path(args.model)
    doc: dict[str, Any] = {"model": args.model, "args": {k: str(v) for k, v in vars(args).items()}}
    for workload, chat in (("chat", True), ("completions", False)):
        rows = asyncio.run(run(args, chat, tokenizer_dir))
        doc[workload] = rows
        print(f"\n{workload}: medians over {args.conversations} conversations (ms)")
        print(f"  {'turn':>4s} {'bytes':>7s} {'tokens':>7s} {'parse':>7s} {'prompt':>7s} {'encode':>7s} {'hashes':>7s}")
        for r in rows:
            encode = f"{r['encode_ms']:7.3f}" if r["encode_ms"] is not None else f"{'-':>7s}"
            print(f"  {r['turn']:4d} {r['body_bytes']:7d} {r['prompt_tokens']:7d} {r['parse_ms']:7.3f} "
                  f"{r['prompt_ms']:7.3f} {encode} {r['hashes_ms']:7.3f}")
    if args.json is not None:
        args.json.write_text(json.dumps(doc, indent=2) + "\n")


if __name__ == "__main__":
    main()
