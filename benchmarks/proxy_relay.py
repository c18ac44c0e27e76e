"""The proxy's host cost per relayed stream event: the real proxy process in front of fake instances that
cost next to nothing, streams read by a client that costs next to nothing, so the figure is the proxy's.

A fake prefill answers every leg with kv_transfer_params at once; a fake decode streams each request's
tokens one event per step (--step-ms apart, every stream in the same step, as an engine does), with the
token ids and prompt ids a migrating proxy asks for. The proxy runs as `python -m pdlaunch.proxy` (1P1D,
the default migration limit, info level as the launcher runs it). Reported: the proxy process's CPU
seconds (/proc) per event the clients received, events a second, and the client's stream wall times.

Usage: python benchmarks/proxy_relay.py [--streams 32] [--tokens 200] [--step-ms 5] [--rounds 3] [--workers N]
       [--json OUT]   (--workers: the proxy's processes; the CPU counted is the supervisor's and its workers')
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

PROMPT_IDS = list(range(100, 140))
PREFILL_ANSWER = {"id": "cmpl-p", "object": "text_completion", "created": 0, "model": "fake",
                  "choices": [{"index": 0, "text": "x", "finish_reason": "length"}],
                  "kv_transfer_params": {"remote_engine_id": "fake", "remote_block_ids": [1]}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, Any]] | None:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    path = lines[0].split(" ")[1]
    length = 0
    for line in lines[1:]:
        if line.lower().startswith("content-length:"):
            length = int(line.split(":", 1)[1])
    body = json.loads(await reader.readexactly(length)) if length else {}
    return path, body


def _json_answer(payload: dict[str, Any]) -> bytes:
    data = json.dumps(payload).encode()
    return b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(data), data)


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


class _Steps:
    """One tick every `step_s` that every open stream waits on: the decode's engine step."""

    def __init__(self, step_s: float) -> None:
        self.step_s = step_s
        self.tick = asyncio.Event()

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.step_s)
            self.tick.set()
            self.tick = asyncio.Event()


async def _serve_fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: str, steps: _Steps) -> None:
    try:
        while True:
            try:
                request = await _read_request(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                return
            if request is None:
                return
            path, body = request
            if path == "/health":
                writer.write(_json_answer({"status": "ok", "engine_id": f"fake-{role}"}))
            elif role == "prefill":
                writer.write(_json_answer(PREFILL_ANSWER))
            else:
                await _stream(writer, body, steps)
            await writer.drain()
    finally:
        writer.close()


async def _stream(writer: asyncio.StreamWriter, body: dict[str, Any], steps: _Steps) -> None:
    writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")
    ids = bool(body.get("return_token_ids"))
    tokens = int(body.get("max_tokens", 16))
    for n in range(tokens):
        await steps.tick.wait()
        choice: dict[str, Any] = {"index": 0, "text": f" t{n}", "logprobs": None,
                                  "finish_reason": "length" if n == tokens - 1 else None}
        event: dict[str, Any] = {"id": "cmpl-fake", "object": "text_completion", "created": 1, "model": "fake",
                                 "choices": [choice]}
        if ids:
            choice["token_ids"] = [1000 + n]
            if n == 0:
                event["prompt_token_ids"] = PROMPT_IDS
        writer.write(_chunk(b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"))
        await writer.drain()
    writer.write(_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")


def _fake_instances(ports: dict[str, int], step_s: float) -> None:
    async def main() -> None:
        steps = _Steps(step_s)
        servers = [await asyncio.start_server(lambda r, w, role=role: _serve_fake(r, w, role, steps), "127.0.0.1",
                                              port) for role, port in ports.items()]
        ticking = asyncio.ensure_future(steps.run())
        await asyncio.gather(*(s.serve_forever() for s in servers), ticking)
    asyncio.run(main())


async def _client_stream(port: int, tokens: int, model: str = "fake") -> tuple[int, float]:
    """(events read, seconds): one streamed completion through the proxy, read as raw bytes."""
    start = time.perf_counter()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    body = json.dumps({"model": model, "prompt": "relay", "max_tokens": tokens, "stream": True,
                       "temperature": 0, "ignore_eos": True}).encode()
    writer.write(b"POST /v1/completions HTTP/1.1\r\nhost: proxy\r\ncontent-type: application/json\r\n"
                 b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body))
    await writer.drain()
    data = b""
    while b"data: [DONE]" not in data:
        piece = await reader.read(65536)
        if not piece:
            break
        data += piece
    writer.close()
    if b" 200 OK" not in data.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"the proxy answered {data[:300]!r}")
    return data.count(b"data: ") - 1, time.perf_counter() - start


def _cpu_seconds(pid: int) -> float:
    """CPU seconds of `pid` and of its live children (the workers of `--workers N`)."""
    pids = [pid]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    pids.append(int(entry.name))
            except OSError:
                continue
    total = 0.0
    for p in pids:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


async def _round(port: int, streams: int, tokens: int) -> tuple[int, float, list[float]]:
    start = time.perf_counter()
    results = await asyncio.gather(*(_client_stream(port, tokens) for _ in range(streams)))
    return sum(r[0] for r in results), time.perf_counter() - start, [r[1] for r in results]


def _wait_ready(port: int, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nhost: proxy\r\nconnection: close\r\n\r\n")
                if b" 200 " in s.recv(256):
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise TimeoutError(f"the proxy on port {port} was not ready within {timeout_s:g}s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--step-ms", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--workers", type=int, default=1, help="proxy processes sharing the port (proxy.workers)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    ports = {"prefill": _free_port(), "decode": _free_port()}
    fake = multiprocessing.get_context("spawn").Process(target=_fake_instances, args=(ports, args.step_ms / 1000),
                                                        daemon=True)
    fake.start()
    proxy_port = _free_port()
    proxy = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(proxy_port), "--log-level", "info",
                              "--prefill", f"prefill-0=http://127.0.0.1:{ports['prefill']}",
                              "--decode", f"decode-0=http://127.0.0.1:{ports['decode']}",
                              "--workers", str(args.workers)])
    rows: list[dict[str, Any]] = []
    try:
        _wait_ready(proxy_port)
        asyncio.run(_round(proxy_port, 4, 8))  # warm-up: connections, imports on first use
        for n in range(args.rounds):
            cpu = _cpu_seconds(proxy.pid)
            events, wall, times = asyncio.run(_round(proxy_port, args.streams, args.tokens))
            cpu = _cpu_seconds(proxy.pid) - cpu
            row = {"round": n + 1, "events": events, "wall_s": wall, "events_per_s": events / wall,
                   "proxy_cpu_s": cpu, "proxy_cpu_us_per_event": cpu / events * 1e6,
                   "proxy_cores": cpu / wall, "stream_s_max": max(times),
                   "ideal_stream_s": args.tokens * args.step_ms / 1000}
            rows.append(row)
            print(f"round {n + 1}: {events} events in {wall:.2f}s ({events / wall:.0f}/s, ideal "
                  f"{args.streams * 1000 / args.step_ms:.0f}/s); proxy {row['proxy_cpu_us_per_event']:.0f} us CPU "
                  f"per event, {row['proxy_cores']:.2f} core", flush=True)
    finally:
        proxy.terminate()
        try:
            proxy.wait(20)
        except subprocess.TimeoutExpired:
            proxy.kill()
            proxy.wait()
        fake.terminate()
        fake.join(10)
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
