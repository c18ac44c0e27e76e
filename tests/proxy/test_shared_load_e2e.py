"""proxy.workers N > 1 share one routing view (pdlaunch/proxy/load_board.py): a real proxy with `--workers 2` and
`--routing-policy least_loaded` in front of two scripted instances. Long streams opened one at a time, three through
one worker and then three through the other, are balanced after every one of them: each worker sees the legs the
other has in flight. With a routing view per worker, each worker spread its own three (2 + 1) and both loaded the
same instance with the extra one (4 + 2; the second worker's first stream already went to the loaded instance when
every worker's round robin started at the same place). /instances, whichever worker
answers it, counts every worker's legs, and every count is back to 0 once the streams end."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from pdlaunch.launcher.ports import PortAllocator
from tests.serving.helpers import ThreadServer, wait_for
from tests.serving.test_proxy_failures import ScriptedInstance

STREAMS = 6  # three through each worker
START_S = 60.0  # two proxy processes importing on a loaded 2-core machine


def _pid_of(client: httpx.Client, url: str) -> int | None:
    """The pid of the worker that holds `client`'s connection (kept alive: later requests go to that worker)."""
    try:
        r = client.get(url + "/health")
    except httpx.HTTPError:
        return None
    return int(r.json()["pid"]) if r.status_code == 200 else None


def _clients_by_worker(stack: ExitStack, url: str) -> dict[int, list[httpx.Client]]:
    """STREAMS // 2 + 1 clients whose one connection each worker holds (one per stream, and one that asks that
    worker's /instances). A new client is a new connection: the kernel hands it to either worker; one it handed
    to a worker that already has its share is left idle."""
    by_worker: dict[int, list[httpx.Client]] = {}

    def enough() -> bool:
        client = stack.enter_context(httpx.Client(timeout=30, limits=httpx.Limits(max_connections=1)))
        pid = _pid_of(client, url)
        if pid is not None:
            by_worker.setdefault(pid, []).append(client)
        return len(by_worker) == 2 and all(len(c) > STREAMS // 2 for c in by_worker.values())

    wait_for(enough, f"{STREAMS // 2 + 1} connections to each of the two workers (so far {by_worker})", START_S)
    return by_worker


def _stream(client: httpx.Client, url: str, started: threading.Event, stop: threading.Event) -> None:
    """One long stream on `client`'s connection: `started` once its first event came, closed once `stop` is set."""
    with client.stream("POST", url + "/v1/completions", json={"prompt": "slow", "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                started.set()
                stop.wait(START_S)
                return


@pytest.fixture
def proxy(tmp_path: Path) -> Iterator[tuple[str, list[ScriptedInstance], Path]]:
    """(proxy URL, the two instances, its log) with two workers and least_loaded."""
    ports = PortAllocator("127.0.0.1")
    instances = [ScriptedInstance("colocated"), ScriptedInstance("colocated")]
    log_path = tmp_path / "proxy.log"
    with ExitStack() as stack:
        servers = [stack.enter_context(ThreadServer(instance.app, ports.free(f"instance {n}")))
                   for n, instance in enumerate(instances)]
        port = ports.free("proxy")
        log = stack.enter_context(open(log_path, "w"))
        proc = subprocess.Popen([sys.executable, "-m", "pdlaunch.proxy", "--port", str(port), "--workers", "2",
                                 "--routing-policy", "least_loaded", "--drain-timeout", "1",
                                 *(a for s in servers for a in ("--colocated", s.url))],
                                stdout=log, stderr=subprocess.STDOUT)
        try:
            yield f"http://127.0.0.1:{port}", instances, log_path
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _in_flight(client: httpx.Client, url: str) -> list[int]:
    return [int(i["in_flight"]) for i in client.get(url + "/instances").json()]


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_least_loaded_balances_streams_over_both_workers(proxy: tuple[str, list[ScriptedInstance], Path]) -> None:
    url, instances, log_path = proxy
    stop = threading.Event()
    threads: list[threading.Thread] = []
    with ExitStack() as stack:
        by_worker = _clients_by_worker(stack, url)
        first, second = by_worker.values()
        observers = [clients[STREAMS // 2] for clients in by_worker.values()]  # /instances through each worker
        try:
            # worker A's streams, then worker B's: each established before the next is opened
            for n, client in enumerate(first[:STREAMS // 2] + second[:STREAMS // 2]):
                started = threading.Event()
                threads.append(threading.Thread(target=_stream, args=(client, url, started, stop), daemon=True))
                threads[-1].start()
                assert started.wait(30), f"stream {n} got no event; proxy log:\n{log_path.read_text()[-3000:]}"
                counts = [len(i.requests) for i in instances]
                assert sum(counts) == n + 1 and max(counts) - min(counts) <= 1, \
                    f"after stream {n} (worker {'AB'[n // (STREAMS // 2)]}) the instances have {counts} streams"
            for observer in observers:  # whichever worker answers, the legs of both
                assert _in_flight(observer, url) == [STREAMS // 2, STREAMS // 2]
        finally:
            stop.set()
            for thread in threads:
                thread.join(30)
        for observer in observers:
            wait_for(lambda o=observer: _in_flight(o, url) == [0, 0], "every leg's count to end", 30)
