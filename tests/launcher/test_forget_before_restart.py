"""A dead prefill or decode is forgotten by its peers before the supervisor restarts it (launcher/forget_peers.py):
every other ready prefill and decode is asked at once, from the death on; the restart waits for their answers at
most until the forget's timeout, a peer that fails or hangs is named and skipped, and the supervisor's loop is
never held longer than that timeout."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.http.auth import INTERNAL_TOKEN_HEADER
from pdlaunch.launcher.forget_peers import Peer, PeerForget, http_ask
from pdlaunch.launcher.supervisor import Supervisor
from pdlaunch.server.internal import KV_FORGET_ENGINE_PATH
from tests.serving.test_fault_tolerance_supervisor import FakeDeployment

PD = [{"role": "prefill", "count": 2}, {"role": "decode", "count": 2}]
ANSWER_S = 0.3


class Peers:
    """The peers' answers: `agents[name]` agents forgotten, an exception raised, or a hang until `release`."""

    def __init__(self, agents: dict[str, int | Exception | None]) -> None:
        self.agents = agents
        self.events: list[tuple[str, str]] = []  # ("ask", peer) and ("restart", instance), in order
        self.release = threading.Event()
        self.lock = threading.Lock()

    def ask(self, url: str, engine_id: str, timeout: float) -> int:
        name = self.urls[url]
        with self.lock:
            self.events.append(("ask", f"{name}:{engine_id}"))
        answer = self.agents.get(name, 0)
        if answer is None:
            self.release.wait(30)
            return 0
        if isinstance(answer, Exception):
            raise answer
        time.sleep(ANSWER_S)  # a peer's answer takes a while: the restart must wait for it
        with self.lock:
            self.events.append(("answered", name))
        return answer


@pytest.fixture()
def supervised(tmp_path: Path) -> Iterator[Any]:
    made: list[tuple[Supervisor, Peers]] = []

    def build(agents: dict[str, int | Exception | None], instances: list[dict[str, object]] = PD,
              **data: object) -> tuple[FakeDeployment, Supervisor, Peers]:
        cfg = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"port": 0}, "instances": instances,
                                               "supervision": {"restart_backoff_seconds": 1}, **data})
        deployment = FakeDeployment(cfg, tmp_path)
        deployment.console = Console(record=True, width=400)
        supervisor = Supervisor(deployment, deployment.console)
        peers = Peers(agents)
        peers.urls = {p.url: p.spec.name for p in deployment.plan.instances}  # type: ignore[attr-defined]
        supervisor.ask_forget = peers.ask
        original = deployment.restart_child

        def restart_child(child, restart: int, why: str) -> str:  # type: ignore[no-untyped-def]
            with peers.lock:
                peers.events.append(("restart", child.name))
            return original(child, restart, why)

        deployment.restart_child = restart_child  # type: ignore[method-assign]
        made.append((supervisor, peers))
        return deployment, supervisor, peers

    yield build
    for supervisor, peers in made:
        peers.release.set()
        supervisor.__exit__()


def _kill(deployment: FakeDeployment, name: str) -> None:
    next(c for c in deployment.instances if c.name == name).code = -9


def test_the_ready_peers_forget_the_dead_decode_before_it_restarts(supervised: Any) -> None:
    deployment, supervisor, peers = supervised({"prefill-0": 1, "prefill-1": 0, "decode-1": 0})
    engine_id = deployment.engine_ids["decode-0"]
    _kill(deployment, "decode-0")
    supervisor.tick(now=100.0)  # the death: the peers are asked from now on
    supervisor.tick(now=101.0)  # due: the restart waits for their answers
    asked = sorted(e for e in peers.events if e[0] == "ask")
    assert asked == [("ask", f"{name}:{engine_id}") for name in ("decode-1", "prefill-0", "prefill-1")]
    assert peers.events[-1] == ("restart", "decode-0") and len(peers.events) == 7, peers.events  # after the answers
    output = deployment.console.export_text()
    assert "prefill-0 forgot decode-0's NIXL agent (1)" in output
    assert "prefill-1 forgot" not in output and "decode-1 forgot" not in output  # nothing to say of none
    assert deployment.restarted == [("decode-0", 1, "planned-decode-0-r1")]


def test_a_peer_that_hangs_delays_the_restart_by_the_timeout_only(supervised: Any) -> None:
    deployment, supervisor, peers = supervised({"prefill-0": None, "prefill-1": 2})
    supervisor.forget_timeout_s = 1.0
    _kill(deployment, "decode-1")
    started = time.monotonic()
    supervisor.tick(now=100.0)
    assert time.monotonic() - started < 0.5, "the death's tick waits for no peer"
    supervisor.tick(now=101.0)
    waited = time.monotonic() - started
    assert 0.9 <= waited < 3.0, waited
    assert deployment.restarted == [("decode-1", 1, "planned-decode-1-r1")]
    output = deployment.console.export_text()
    assert "prefill-0 did not answer within 1s when asked to forget decode-1's NIXL agent" in output, output
    assert "prefill-1 forgot decode-1's NIXL agents (2)" in output


def test_a_peer_that_cannot_be_reached_is_named_and_skipped(supervised: Any) -> None:
    deployment, supervisor, _ = supervised({"decode-0": httpx.ConnectError("connection refused")})
    _kill(deployment, "prefill-1")
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)
    assert deployment.restarted == [("prefill-1", 1, "planned-prefill-1-r1")]
    assert ("decode-0 could not be asked to forget prefill-1's NIXL agent (engine "
            f"{deployment.engine_ids['prefill-1']}): ConnectError: connection refused") in \
        deployment.console.export_text()


def test_peers_that_are_down_or_stalled_are_not_asked(supervised: Any) -> None:
    deployment, supervisor, peers = supervised({})
    deployment.rows["prefill-1"].state = "stalled"
    _kill(deployment, "decode-0")
    _kill(deployment, "prefill-0")
    supervisor.tick(now=0.0)  # both died: neither is asked to forget the other
    supervisor.tick(now=1.0)
    asked = {e[1].split(":")[0] for e in peers.events if e[0] == "ask"}
    assert asked == {"decode-1"}
    assert {name for name, _, _ in deployment.restarted} == {"decode-0", "prefill-0"}


@pytest.mark.parametrize("data", [{"kv_transfer": {"connector": "storage"}}, {}], ids=["storage", "proxy"])
def test_no_forget_without_transfer_agents_or_for_the_proxy(supervised: Any, data: dict[str, object]) -> None:
    deployment, supervisor, peers = supervised({}, **data)
    if data:
        _kill(deployment, "decode-0")
    else:
        deployment.proxy.code = -9
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)
    assert peers.events == [("restart", "decode-0" if data else "proxy")]


def test_a_mooncake_deployment_names_its_transport(supervised: Any) -> None:
    deployment, supervisor, _ = supervised({"decode-0": 1}, kv_transfer={"connector": "mooncake"})
    _kill(deployment, "prefill-0")
    supervisor.tick(now=0.0)
    supervisor.tick(now=1.0)
    assert "decode-0 forgot prefill-0's Mooncake agent (1)" in deployment.console.export_text()


class _Instance(BaseHTTPRequestHandler):
    answers: list[tuple[int, object]] = []
    seen: list[tuple[str, str | None, object]] = []

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((self.path, self.headers.get(INTERNAL_TOKEN_HEADER), body))
        status, answer = self.answers.pop(0)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


def test_the_http_ask_sends_the_internal_token_and_checks_the_answer() -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Instance)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    ask = http_ask({INTERNAL_TOKEN_HEADER: "token"})
    try:
        _Instance.answers = [(200, {"engine_id": "D0", "forgotten": 2}), (503, {"error": "not ready"}),
                             (200, {"forgotten": True}), (200, {"forgotten": -1})]
        assert ask(url, "D0", 5.0) == 2
        assert _Instance.seen == [(KV_FORGET_ENGINE_PATH, "token", {"engine_id": "D0"})]
        with pytest.raises(RuntimeError, match="HTTP 503"):
            ask(url, "D0", 5.0)
        for _ in range(2):
            with pytest.raises(RuntimeError, match="names no count of agents forgotten"):
                ask(url, "D0", 5.0)
    finally:
        server.shutdown()
        server.server_close()


class _Trickling(BaseHTTPRequestHandler):
    """A peer that answers in pieces: its head, then a byte a while (every read within httpx's timeout), or
    megabytes of body at once (`huge`)."""

    huge = False
    stop = threading.Event()

    def do_POST(self) -> None:  # noqa: N802 - the stdlib's name
        self.rfile.read(int(self.headers["Content-Length"]))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.flush()
        try:
            if self.huge:
                chunk = b" " * (1 << 20)
                while not self.stop.is_set():
                    self.wfile.write(chunk)
                return
            while not self.stop.wait(0.2):  # whitespace before the JSON: a valid answer, were it to end
                self.wfile.write(b" ")
                self.wfile.flush()
        except OSError:  # the ask gave up and closed its connection
            pass

    def log_message(self, *args: object) -> None:
        pass


def _forget_threads(before: set[threading.Thread]) -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("pdlaunch-forget") and t not in before]


@pytest.mark.parametrize("huge", [False, True], ids=["trickle", "huge"])
def test_a_peer_that_trickles_or_floods_its_answer_is_given_up_on_within_the_timeout(huge: bool) -> None:
    """httpx's timeout bounds each read, not the answer: a peer that sends a byte now and then held its forget thread
    (and socket) for good, and one that sends megabytes was read on. One overall deadline bounds the whole ask, a byte
    limit its answer; the thread ends with it."""
    _Trickling.huge, _Trickling.stop = huge, threading.Event()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Trickling)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    peer = Peer("decode-0", f"http://127.0.0.1:{server.server_address[1]}")
    before = set(threading.enumerate())  # another test's forget threads are not this one's
    try:
        started = time.monotonic()
        forget = PeerForget("prefill-0", "P0", [peer], http_ask({INTERNAL_TOKEN_HEADER: "token"}), "NIXL", timeout=1.0)
        deadline = time.monotonic() + 10.0
        while _forget_threads(before) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _forget_threads(before), "the forget thread outlived its timeout by far"
        took = time.monotonic() - started
        assert took < 3.0, f"the ask took {took:.1f}s for a 1s timeout"
        (line,) = forget.wait()
        expected = ("decode-0 could not be asked to forget prefill-0's NIXL agent (engine P0): AnswerTooLarge: an "
                    "answer of more than 65536 bytes" if huge else
                    "decode-0 did not answer within 1s when asked to forget prefill-0's NIXL agent (engine P0)")
        assert line.startswith(expected), line
    finally:
        _Trickling.stop.set()
        server.shutdown()
        server.server_close()
