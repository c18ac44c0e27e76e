"""Acceptance of issue 14 item 7: `pdlaunch serve` 2 prefill + 2 decode on CPU under continuous load;
SIGKILL one prefill, then one decode, then the proxy. Serve keeps running, each comes back (instances
with a new engine_id), only requests that touched the killed process fail (with a clean error),
KV blocks return to 0 and no process is left behind."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.serving.e2e import Serve, alive, children_of, wait_gone
from tests.serving.helpers import wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

CONFIG = """\
supervision: {restart_backoff_seconds: 0.5, max_restarts: 5, role_down_grace_seconds: 120}
kv_transfer: {kv_lease_seconds: 3}
instances:
  - {role: prefill, count: 2}
  - {role: decode, count: 2}
"""
STREAMS = 3  # concurrent client loops
RECOVERED = 2 * STREAMS  # requests ended after a recovery before the next kill (two a client loop)
REQUEST_TIMEOUT_S = 60.0
RESTART_TIMEOUT_S = 150.0  # a restarted instance imports torch and builds its engine on a loaded 2-core box
NOT_OPENAI = "not an OpenAI error body:"
IDLE_BLOCKS_TIMEOUT_S = 30.0  # kv_lease_seconds (3) plus the prefill's expiry sweep, with margin


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    error: str = ""


class Load:
    """STREAMS threads sending small completions (every other one streamed) until stopped."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.model = httpx.get(f"{url}/v1/models", timeout=5, trust_env=False).json()["data"][0]["id"]
        self.outcomes: list[Outcome] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, args=(i,), daemon=True) for i in range(STREAMS)]

    def __enter__(self) -> Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(REQUEST_TIMEOUT_S + 5)

    def _loop(self, worker: int) -> None:
        with httpx.Client(trust_env=False, timeout=REQUEST_TIMEOUT_S) as client:
            n = 0
            while not self._stop.is_set():
                n += 1
                started = time.monotonic()
                ok, error = self._one(client, f"Request {worker}-{n} says", stream=n % 2 == 0)
                self.outcomes.append(Outcome(started, time.monotonic(), ok, error))
                if not ok:
                    time.sleep(0.2)  # a client backs off a little after an error

    def _one(self, client: httpx.Client, prompt: str, stream: bool) -> tuple[bool, str]:
        body = {"model": self.model, "prompt": prompt, "max_tokens": 6, "temperature": 0, "stream": stream}
        try:
            with client.stream("POST", f"{self.url}/v1/completions", json=body) as response:
                text = response.read().decode(errors="replace")
        except httpx.HTTPError as exc:
            return False, f"client: {type(exc).__name__}: {exc}"
        if response.status_code != 200:
            try:
                return False, f"HTTP {response.status_code}: {json.loads(text)['error']['message']}"
            except (json.JSONDecodeError, KeyError, TypeError):
                return False, f"{NOT_OPENAI} HTTP {response.status_code}: {text[:300]!r}"
        if not stream:
            return bool(json.loads(text)["choices"]), ""
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        errors = [json.loads(e)["error"]["message"] for e in events if e.startswith('{"error"')]
        if errors:
            return False, f"stream: {errors[0]}"
        return events[-1:] == ["[DONE]"], "" if events[-1:] == ["[DONE]"] else f"stream ended early: {events[-2:]}"

    def succeeded(self, after: float) -> int:
        """Successes among the requests started after `after`; fails at once on an error that is no OpenAI error."""
        outcomes = self.between(after, float("inf"))
        odd = [o.error for o in outcomes if o.error.startswith(NOT_OPENAI)]
        assert not odd, odd[:3]
        return sum(o.ok for o in outcomes)

    def between(self, start: float, end: float) -> list[Outcome]:
        return [o for o in list(self.outcomes) if start <= o.started < end]


@pytest.fixture()
def serve(tmp_path: Path) -> Iterator[Serve]:
    config = tmp_path / "pd.yaml"
    config.write_text(CONFIG)
    deployment = Serve(tmp_path, [str(config), "--model", "tiny", "--num-gpu-blocks", "128", "--max-num-seqs", "16"])
    try:
        yield deployment.wait_ready()
    finally:
        deployment.stop()


def _health(url: str) -> dict[str, object] | None:
    try:
        response = httpx.get(f"{url}/health", timeout=2, trust_env=False)
    except httpx.HTTPError:
        return None
    return response.json() if response.status_code == 200 else None


def _proxy_sees_ready(serve: Serve, name: str) -> bool:
    try:
        instances = httpx.get(f"{serve.url}/instances", timeout=2, trust_env=False).json()
    except httpx.HTTPError:
        return False
    return any(i["name"] == name and i["state"] == "ready" for i in instances)


def _kill_and_wait_back(serve: Serve, victim: str, urls: dict[str, str]) -> tuple[float, float]:
    """SIGKILL `victim` (an instance name or "proxy"); wait until it serves again. Returns (killed, back)."""
    url = serve.url if victim == "proxy" else urls[victim]
    before = _health(url)
    assert before is not None, f"{victim} is not healthy before the kill"
    pid = int(httpx.get(f"{url}/info" if victim != "proxy" else f"{url}/health", timeout=5).json()["pid"])
    killed = time.monotonic()
    os.kill(pid, signal.SIGKILL)

    def back() -> bool:
        assert serve.proc.poll() is None, f"serve exited with {serve.proc.returncode}:\n{serve.output}"
        now = _health(url)
        if now is None:
            return False
        if victim == "proxy":
            return now["pid"] != pid
        assert now["engine_id"] == f"{before['engine_id']}-r1", now  # a new NIXL agent, a new engine_id
        return _proxy_sees_ready(serve, victim)

    wait_for(back, f"{victim} to be back after SIGKILL", RESTART_TIMEOUT_S, poll=0.2)
    return killed, time.monotonic()


def _touched(outcome: Outcome, victim: str) -> bool:
    """Did this failed request involve the killed process? The proxy names the instance it failed on;
    a decode that could not read KV from a killed prefill names that prefill's engine; a dead proxy
    is a failed connection."""
    if victim == "proxy":
        return outcome.error.startswith("client:")
    return victim in outcome.error


def test_one_prefill_then_one_decode_then_the_proxy_die_and_come_back(serve: Serve) -> None:
    urls = serve.instance_urls()
    assert sorted(urls) == ["decode-0", "decode-1", "prefill-0", "prefill-1"]
    windows: list[tuple[str, float, float]] = []
    with Load(serve.url) as load:
        wait_for(lambda: load.succeeded(after=0) >= 6, "the load to be flowing", 60)
        for victim in ("prefill-0", "decode-0", "proxy"):
            killed, back = _kill_and_wait_back(serve, victim, urls)
            windows.append((victim, killed, back))
            # Load on the recovered deployment: RECOVERED requests that started a second after it was back have
            # ended (the assertion below reads them) before the next kill; it once slept 3 s here instead.
            wait_for(lambda back=back: len(load.between(back + 1.0, float("inf"))) >= RECOVERED,
                     f"{RECOVERED} requests after {victim} was back", REQUEST_TIMEOUT_S + 1.0)
        after = time.monotonic()
        wait_for(lambda: load.succeeded(after) >= 6, "requests after the last recovery", 60)
    assert serve.proc.poll() is None, f"serve exited:\n{serve.output}"

    failed = [o for o in load.outcomes if not o.ok]
    for victim, killed, back in windows:
        print(f"{victim}: back after {back - killed:.1f}s; failed requests: "
              f"{sum(1 for o in failed if _touched(o, victim) and o.ended >= killed and o.started < back)}")
    unclean = [o.error for o in failed if not o.error.startswith(("HTTP 5", "stream: ", "client: "))]
    assert not unclean, f"failures without an OpenAI error (body or SSE event): {unclean[:5]}"
    stray = [o.error for o in failed
             if not any(_touched(o, v) and o.ended >= killed and o.started < back for v, killed, back in windows)]
    assert not stray, f"requests that did not touch the killed process failed: {stray[:5]}"
    for i, (victim, _, back) in enumerate(windows):
        # Recovered: the requests that started a second after the victim was back (and ended before the
        # next kill) all succeeded.
        next_kill = windows[i + 1][1] if i + 1 < len(windows) else float("inf")
        later = [o for o in load.between(back + 1.0, next_kill) if o.ended < next_kill]
        assert later and all(o.ok for o in later), (victim, [o.error for o in later if not o.ok][:5])
        assert f"{victim}: restart 1" in serve.output
    assert all(o.ok for o in load.between(after, float("inf")))
    assert "restarting (1)" in serve.output
    assert "restart 1 of prefill-0" in (serve.log_dir / "prefill-0.log").read_text(errors="replace")

    def idle() -> bool:
        infos = [httpx.get(f"{u}/info", timeout=5, trust_env=False).json() for u in urls.values()]
        return all(i["num_blocks_used"] == 0 and i["num_pending_requests"] == 0 for i in infos)

    wait_for(idle, "KV blocks back to 0 on every instance", IDLE_BLOCKS_TIMEOUT_S, poll=0.5)

    children = children_of(serve.proc.pid)
    assert len(children) == 5, children  # 4 instances and the proxy, the dead ones replaced
    serve.stop()
    assert serve.proc.returncode == 0, serve.output
    wait_gone(children)
    assert children_of(serve.proc.pid) == [] and not alive(children)
