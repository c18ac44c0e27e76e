"""Soak test of a PD deployment (issue 14): mixed load, client disconnects and injected KV-transfer
failures for a long time, then checks that nothing leaked and every failure was a clear answer.

    python benchmarks/soak.py --minutes 10 --prefill 2 --decode 2 --json benchmarks/results/cpu-soak.json

Starts `pdlaunch serve` (demo model unless --model) with PDLAUNCH_TEST_FAIL_TRANSFER_RATE set (a test-only
hook: that fraction of KV loads fails through the real failure path), warms up, snapshots every process
(KV blocks used, threads, open fds, RSS), drives load until the deadline, waits for the deployment to go
idle, snapshots again. PASS when:
  - every request ended in a success or a clear error (an OpenAI error body, or an SSE error event);
    a hang, a non-JSON error, a connection reset by an instance or a stream cut without [DONE] counts as
    unclear,
  - KV blocks used are back to 0 on every instance,
  - per process: RSS grew < 5 % from the post-warm-up snapshot, threads and fds did not grow beyond a small
    slack (pools settle during warm-up),
  - no "Traceback" in any log file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

RSS_GROWTH_LIMIT = 0.05
THREAD_SLACK = 4  # a thread pool may add a worker or two after warm-up under a different mix
FD_SLACK = 16  # keep-alive sockets of the proxy's client pool come and go
REQUEST_TIMEOUT_S = 120.0


@dataclass
class Tally:
    ok: int = 0
    clear_error: int = 0
    disconnected: int = 0  # the client went away on purpose
    unclear: int = 0
    unclear_examples: list[str] = field(default_factory=list)
    error_examples: dict[str, int] = field(default_factory=dict)

    def error(self, message: str) -> None:
        self.clear_error += 1
        key = message[:120]
        self.error_examples[key] = self.error_examples.get(key, 0) + 1

    def bad(self, what: str) -> None:
        self.unclear += 1
        if len(self.unclear_examples) < 20:
            self.unclear_examples.append(what[:300])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def proc_stats(pid: int) -> dict[str, int]:
    status = Path(f"/proc/{pid}/status").read_text()
    values = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
    return {"rss_kb": int(values["VmRSS"].split()[0]), "threads": int(values["Threads"]),
            "fds": len(os.listdir(f"/proc/{pid}/fd"))}


def snapshot(client: httpx.Client, base: str, headers: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Per process (instances and the proxy): KV blocks used, RSS, threads, fds."""
    out: dict[str, dict[str, Any]] = {}
    proxy = client.get(f"{base}/health", headers=headers).json()
    out["proxy"] = {"pid": proxy["pid"], **proc_stats(int(proxy["pid"]))}
    for inst in client.get(f"{base}/instances", headers=headers).json():
        info = client.get(f"{inst['url']}/info", headers=headers).json()
        out[inst["name"]] = {"pid": info["pid"], "blocks_used": info.get("num_blocks_used") or 0,
                             **proc_stats(int(info["pid"]))}
    return out


def body_of(rng: random.Random, model: str, chat: bool, stream: bool) -> dict[str, Any]:
    words = " ".join(rng.choice(["alpha", "beta", "gamma", "delta", "kv", "block", "decode"])
                     for _ in range(rng.randint(1, 120)))
    body: dict[str, Any] = {"model": model, "max_tokens": rng.randint(1, 24), "stream": stream,
                            "temperature": rng.choice([0.0, 0.7]), "seed": rng.randint(0, 1000)}
    if chat:
        body["messages"] = [{"role": "user", "content": words}]
    else:
        body["prompt"] = words
    return body


async def one_request(client: httpx.AsyncClient, base: str, headers: dict[str, str], rng: random.Random,
                      model: str, tally: Tally, disconnect_rate: float) -> None:
    chat, stream = rng.random() < 0.5, rng.random() < 0.5
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = body_of(rng, model, chat, stream)
    leave = rng.random() < disconnect_rate
    try:
        if not stream:
            call = client.post(base + path, json=body, headers=headers, timeout=REQUEST_TIMEOUT_S)
            if leave:  # the client gives up mid-request: the proxy sees a disconnect
                try:
                    await asyncio.wait_for(call, rng.uniform(0.01, 0.3))
                except asyncio.TimeoutError:
                    tally.disconnected += 1
                    return
                tally.ok += 1
                return
            response = await call
            classify(response.status_code, response.content, tally)
            return
        async with client.stream("POST", base + path, json=body, headers=headers,
                                 timeout=REQUEST_TIMEOUT_S) as response:
            if response.status_code != 200:
                classify(response.status_code, await response.aread(), tally)
                return
            done = False
            async for line in response.aiter_lines():
                if leave:
                    tally.disconnected += 1
                    return  # closing the stream early is the disconnect
                if line.startswith("data: "):
                    data = line[6:]
                    if data == "[DONE]":
                        done = True
                    elif data.startswith('{"error"'):
                        tally.error(json.loads(data)["error"].get("message", ""))
                        return
            if done:
                tally.ok += 1
            else:
                tally.bad(f"stream ended without [DONE] or an error event ({path})")
    except (httpx.HTTPError, asyncio.TimeoutError) as exc:
        tally.bad(f"{type(exc).__name__}: {exc} ({path}, stream={stream})")


def classify(status: int, content: bytes, tally: Tally) -> None:
    if status == 200:
        tally.ok += 1
        return
    try:
        message = json.loads(content)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        tally.bad(f"HTTP {status} without an OpenAI error body: {content[:200]!r}")
        return
    tally.error(f"{status}: {message}")


async def drive(base: str, headers: dict[str, str], model: str, seconds: float, concurrency: int,
                disconnect_rate: float, seed: int, tally: Tally) -> None:
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:
        async def worker(k: int) -> None:
            rng = random.Random(seed * 1000 + k)
            while time.monotonic() < deadline:
                await one_request(client, base, headers, rng, model, tally, disconnect_rate)

        await asyncio.gather(*(worker(k) for k in range(concurrency)))


def kv_counters(client: httpx.Client, base: str, headers: dict[str, str]) -> dict[str, float]:
    """Summed over the instances: transfer failures and local recomputes (what the injected failures became)."""
    wanted = ("pdlaunch_kv_transfer_failures_total", "pdlaunch_kv_load_recomputes_total",
              "pdlaunch_kv_transfer_bytes_total")
    totals = dict.fromkeys(wanted, 0.0)
    for inst in client.get(f"{base}/instances", headers=headers).json():
        for line in client.get(f"{inst['url']}/metrics", headers=headers).text.splitlines():
            name = line.split("{")[0].split(" ")[0]
            if name in totals:
                totals[name] += float(line.rsplit(" ", 1)[1])
    return totals


def wait_idle(client: httpx.Client, base: str, headers: dict[str, str], timeout: float) -> dict[str, Any]:
    """The snapshot once every instance holds 0 KV blocks, or the last one after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        snap = snapshot(client, base, headers)
        if all(v.get("blocks_used", 0) == 0 for v in snap.values()) or time.monotonic() > deadline:
            return snap
        time.sleep(1.0)


def verdict(before: dict[str, Any], after: dict[str, Any], tally: Tally, tracebacks: list[str]) -> list[str]:
    problems = []
    if tally.unclear:
        problems.append(f"{tally.unclear} requests ended without a clear answer: {tally.unclear_examples[:3]}")
    for name, end in after.items():
        start = before.get(name)
        if end.get("blocks_used", 0):
            problems.append(f"{name}: {end['blocks_used']} KV blocks still used when idle")
        if start is None or start["pid"] != end["pid"]:
            problems.append(f"{name}: process changed during the soak (pid {start and start['pid']} -> {end['pid']})")
            continue
        growth = end["rss_kb"] / start["rss_kb"] - 1
        if growth >= RSS_GROWTH_LIMIT:
            problems.append(f"{name}: RSS grew {growth:.1%} ({start['rss_kb']} -> {end['rss_kb']} kB)")
        if end["threads"] > start["threads"] + THREAD_SLACK:
            problems.append(f"{name}: threads {start['threads']} -> {end['threads']}")
        if end["fds"] > start["fds"] + FD_SLACK:
            problems.append(f"{name}: open fds {start['fds']} -> {end['fds']}")
    problems += [f"traceback in {path}" for path in tracebacks]
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--warmup-seconds", type=float, default=30.0)
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--prefill", type=int, default=2)
    parser.add_argument("--decode", type=int, default=2)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--fail-rate", type=float, default=0.05, help="PDLAUNCH_TEST_FAIL_TRANSFER_RATE")
    parser.add_argument("--disconnect-rate", type=float, default=0.1)
    parser.add_argument("--lease-seconds", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-dir", type=Path, default=Path("/tmp/pdlaunch-soak"))
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    for name in ("minutes", "concurrency"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name} must be > 0")

    args.log_dir.mkdir(parents=True, exist_ok=True)
    config = args.log_dir / "soak.yaml"
    config.write_text(f"kv_transfer: {{kv_lease_seconds: {args.lease_seconds}}}\n")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    api_key = os.environ.get("PDLAUNCH_API_KEY")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    env = {**os.environ, "PDLAUNCH_TEST_FAIL_TRANSFER_RATE": str(args.fail_rate)}
    argv_serve = [sys.executable, "-m", "pdlaunch", "serve", str(config), "--model", args.model, "--device", "cpu",
                  "--prefill", str(args.prefill), "--decode", str(args.decode), "--port", str(port),
                  "--log-dir", str(args.log_dir / "logs")]
    out = open(args.log_dir / "serve.out", "wb")
    serve = subprocess.Popen(argv_serve, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env)
    client = httpx.Client(trust_env=False, timeout=10.0)
    result: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}}
    try:
        deadline = time.monotonic() + 300
        while True:
            if serve.poll() is not None:
                raise SystemExit(f"pdlaunch serve exited with {serve.returncode}; see {args.log_dir / 'serve.out'}")
            try:
                if client.get(f"{base}/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("pdlaunch serve did not become ready within 300 s")
            time.sleep(0.5)
        warm = Tally()
        asyncio.run(drive(base, headers, args.model, args.warmup_seconds, args.concurrency, args.disconnect_rate,
                          args.seed, warm))
        before = wait_idle(client, base, headers, args.lease_seconds + 30)
        tally = Tally()
        started = time.monotonic()
        asyncio.run(drive(base, headers, args.model, args.minutes * 60, args.concurrency, args.disconnect_rate,
                          args.seed + 1, tally))
        elapsed = time.monotonic() - started
        after = wait_idle(client, base, headers, args.lease_seconds + 30)
        logs = sorted((args.log_dir / "logs").glob("*.log"))
        tracebacks = [str(p) for p in logs if "Traceback" in p.read_text(errors="replace")]
        problems = verdict(before, after, tally, tracebacks)
        result["kv_counters"] = kv_counters(client, base, headers)
        result.update({"seconds": round(elapsed, 1), "requests": asdict(tally), "before": before, "after": after,
                       "problems": problems, "pass": not problems})
    finally:
        client.close()
        if serve.poll() is None:
            serve.send_signal(signal.SIGINT)
            try:
                serve.wait(60)
            except subprocess.TimeoutExpired:
                serve.kill()
        out.close()
    print(json.dumps({k: result[k] for k in ("seconds", "requests", "kv_counters", "problems", "pass") if k in result},
                     indent=2))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0 if result.get("pass") else 1


if __name__ == "__main__":
    sys.exit(main())
