"""`--backend ray`: an instance's rank-0 actor that Ray reports "temporarily unavailable" (ActorUnavailableError: the
driver lost its connection to the actor, a network blip, its node's raylet out of touch; the actor may come back) is
not dead yet. Before, any RayActorError failing the instance's `serve` call ended the instance at once: its actors
killed, its placement group removed, a restart planned, for a blip of a second. Now the instance is kept (the proxy's
/health probe decides where requests go meanwhile) and its actor asked again each tick; one that answers within
ray_unreachable.UNREACHABLE_GRACE_S is kept serving (its end watched through a new call, its `serve` call being lost),
one that does not is ended naming how long its node has been unreachable, and one that Ray then reports dead is ended
as a dead one. Ray's own exception classes; a stand-in for the ray module and the rank-0 actor's handle.

A node killed outright (its raylet gone, its host up) was reported unavailable too, and kept for the whole grace: now
its raylet (recorded at launch from Ray's node table) is asked for a TCP connection, and one it refuses ends the
instance at once, naming the raylet; one accepted, or one that times out (a blip), keeps the grace. Real sockets.
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.config.deployment_config import InstanceSpec  # noqa: E402 (after the importorskip)
from pdlaunch.launcher.backends import ray_unreachable  # noqa: E402
from pdlaunch.launcher.backends.ray_actors import CONTROL, WATCH  # noqa: E402
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from pdlaunch.launcher.backends.ray_instance import ServeOutcome  # noqa: E402
from pdlaunch.launcher.backends.ray_run import RayRun  # noqa: E402
from pdlaunch.launcher.backends.ray_unreachable import RayletAnswer, RayletProbe  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, ray, running_on, task_error  # noqa: E402
from tests.cluster.test_ray_outside_kill import DIED_SIGKILL, actor_died  # noqa: E402

SOCKET_CLOSED = "The actor is temporarily unavailable: RpcError: RPC Error message: Socket closed; RPC Error details: "
NODE = "10.0.0.2"


def unavailable() -> BaseException:
    """What Ray 2.60 raises for a call whose connection to its actor broke while the GCS still has it alive."""
    return ray.exceptions.ActorUnavailableError(SOCKET_CLOSED, b"\x02" * 16)


class Method:
    """`handle.METHOD.options(concurrency_group=G).remote()`: each call a fresh ref `METHOD-N`, its group recorded."""

    def __init__(self, name: str, calls: list[tuple[str, str | None]]) -> None:
        self.name, self.calls = name, calls

    def options(self, concurrency_group: str | None = None) -> types.SimpleNamespace:
        def remote() -> str:
            self.calls.append((self.name, concurrency_group))
            return f"{self.name}-{sum(1 for name, _ in self.calls if name == self.name)}"
        return types.SimpleNamespace(remote=remote)


class Leader:
    """The rank-0 actor's handle."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str | None]] = []
        self.node_address, self.served = Method("node_address", self.calls), Method("served", self.calls)


class ScriptedRay(FakeRay):
    """`get` raises what `failures` holds, returns what `results` holds (else 0); `pending` refs are not done."""

    def __init__(self) -> None:
        super().__init__()
        self.results: dict[str, object] = {}
        self.pending: set[str] = set()

    def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None) -> tuple[list[str], list[str]]:
        return [r for r in refs if r not in self.pending], [r for r in refs if r in self.pending]

    def get(self, ref: str) -> object:
        if ref in self.failures:
            raise self.failures[ref]
        return self.results.get(ref, 0)


@pytest.fixture
def fake() -> ScriptedRay:
    return ScriptedRay()


@pytest.fixture
def deployment(fake: ScriptedRay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayDeployment]:
    with running_on(fake, tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def said(deployment: RayDeployment, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    lines: list[str] = []
    monkeypatch.setattr(deployment, "say", lines.append)
    deployment.actors.say = lines.append
    return lines


@pytest.fixture
def run(deployment: RayDeployment, fake: ScriptedRay) -> RayRun:
    """prefill-0, ready on node NODE; its `serve` call failed because Ray lost touch with its actor."""
    run = deployment.runs[0]
    run.state, run.serve_ref, run.actors = "ready", "serve", [Leader()]  # type: ignore[assignment,list-item]
    run.spec = InstanceSpec(role="prefill", port=8100, host=NODE, engine_id="e")
    fake.failures["serve"] = unavailable()
    return run


def leader(run: RayRun) -> Leader:
    """The run's rank-0 actor handle (taken before a tick that may end the run: its actors are forgotten then)."""
    found = run.actors[0]
    assert isinstance(found, Leader)
    return found


def test_an_actor_unreachable_for_a_few_ticks_then_answering_is_kept(deployment: RayDeployment, fake: ScriptedRay,
                                                                      run: RayRun, said: list[str]) -> None:
    fake.failures["node_address-1"] = unavailable()
    fake.failures["node_address-2"] = unavailable()
    fake.results["node_address-3"] = NODE
    for _ in range(4):
        deployment.tick()
    assert run.state == "ready" and "kill" not in fake.calls, (said, fake.calls)
    assert not any("restart" in s for s in said), said
    first = [s for s in said if "does not answer" in s]
    assert len(first) == 1 and first[0].startswith(f"prefill-0: its Ray actor on node {NODE} does not answer "
                                                   f"(Ray: {SOCKET_CLOSED.strip()}"), said
    assert f"kept for up to {ray_unreachable.UNREACHABLE_GRACE_S:.0f}s" in first[0], first
    assert any(s.startswith(f"prefill-0: its Ray actor on node {NODE} answers again") for s in said), said
    # the probes run beside serve (its default group is busy with it); the instance's end is watched anew
    assert leader(run).calls == [("node_address", CONTROL)] * 3 + [("served", WATCH)], leader(run).calls
    assert run.serve_ref == "served-1"

    fake.results["served-1"] = 1  # the instance ends later: that is seen, as before the blip
    deployment.tick()
    assert run.state == "down", said
    assert any(s.startswith("prefill-0 exited with code 1; its actors and placement group are removed; restart 1")
               for s in said), said


def test_an_actor_unreachable_past_the_grace_is_ended_naming_it(deployment: RayDeployment, fake: ScriptedRay,
                                                                 run: RayRun, said: list[str]) -> None:
    fake.pending.add("node_address-1")  # its node's raylet stopped: the call is not answered at all
    handle = leader(run)
    deployment.tick()
    deployment.tick()
    assert run.state == "ready" and run.unreachable is not None, said
    run.unreachable.since -= ray_unreachable.UNREACHABLE_GRACE_S  # that long ago
    deployment.tick()
    assert run.state == "down" and run.unreachable is None, said
    ended = [s for s in said if s.startswith("prefill-0 lost its Ray actor")]
    assert len(ended) == 1, said
    assert ended[0].startswith(f"prefill-0 lost its Ray actor: on node {NODE} it has been unreachable for "
                               f"{ray_unreachable.UNREACHABLE_GRACE_S:.0f}s (Ray: {SOCKET_CLOSED.strip()}"), ended
    assert "its actors and placement group are removed; restart 1" in ended[0], ended
    assert handle.calls == [("node_address", CONTROL)], "a second probe went out while one was unanswered"


def test_an_unreachable_actor_ray_then_reports_dead_is_ended_as_dead(deployment: RayDeployment, fake: ScriptedRay,
                                                                      run: RayRun, said: list[str]) -> None:
    fake.failures["node_address-1"] = unavailable()
    fake.failures["node_address-2"] = actor_died(DIED_SIGKILL)  # type: ignore[assignment]
    for _ in range(3):  # serve's failure and the first probe; its answer and the second; the second's answer
        deployment.tick()
    assert run.state == "down", said
    assert any(s.startswith(f"prefill-0 lost its Ray actor (a SIGKILL pdlaunch did not send: most often the kernel's "
                            f"OOM killer on node {NODE}") for s in said), said


def test_an_instance_that_failed_while_unreachable_names_its_failure(deployment: RayDeployment, fake: ScriptedRay,
                                                                     run: RayRun, said: list[str]) -> None:
    """It answers again, but its serve had already raised: the watch on its end says what it raised."""
    fake.results["node_address-1"] = NODE
    fake.failures["served-1"] = task_error("ray::RayInstance.served()", RuntimeError("CUDA error: out of memory"))
    for _ in range(3):  # serve's failure and the probe; the probe's answer and the watch; the watch's answer
        deployment.tick()
    assert any(s.startswith("prefill-0 failed in its Ray actor (RuntimeError: CUDA error: out of memory)")
               for s in said), said


def test_a_died_actor_keeps_being_ended_at_once(deployment: RayDeployment, fake: ScriptedRay, run: RayRun,
                                               said: list[str]) -> None:
    fake.failures["serve"] = actor_died("The actor died because its node has died. Node Id: 6f1c")  # type: ignore[assignment]
    handle = leader(run)
    deployment.tick()
    assert run.state == "down" and handle.calls == [], said


class RankActor:
    def __init__(self, ref: str) -> None:
        self.node_address = types.SimpleNamespace(remote=lambda: ref)


def test_an_unreachable_rank_actor_is_named_where_rank_0_exits(deployment: RayDeployment, fake: ScriptedRay,
                                                               run: RayRun) -> None:
    """Rank 0 exited with code 1 because it lost touch with TP rank 1: said, as a killed rank is."""
    fake.failures.pop("serve")
    fake.results["serve"] = 1
    run.actors = [Leader(), RankActor("rank-1")]  # type: ignore[list-item]
    fake.failures["rank-1"] = unavailable()
    assert deployment.actors.exit_of(run) == f"exited with code 1 (its TP rank 1 actor is unreachable (Ray: " \
                                             f"{SOCKET_CLOSED.strip()}))"


def test_the_serve_outcome_is_handed_to_a_later_watch() -> None:
    """RayInstance.served, the watch on an instance's end once its `serve` call is lost: what serve returned or raised,
    once it has; an error at once when serve never began."""
    outcome = ServeOutcome()
    with pytest.raises(RuntimeError, match="never began"):
        outcome.wait(began_within_s=0.01)
    outcome.begin()
    got: list[object] = []
    waiter = threading.Thread(target=lambda: got.append(outcome.wait(began_within_s=0.01)))
    waiter.start()
    outcome.end(3)
    waiter.join(timeout=30.0)
    assert got == [3]
    failed = ServeOutcome()
    failed.begin()
    failed.end(ValueError("engine exploded"))
    with pytest.raises(ValueError, match="engine exploded"):
        failed.wait(began_within_s=0.01)


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections: a raylet alive."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        yield server.getsockname()[1]


@pytest.fixture
def closed() -> int:
    """A port on 127.0.0.1 nothing listens on: a raylet gone, its host up (the kernel refuses the connection)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        return int(taken.getsockname()[1])


@pytest.fixture
def silent() -> Iterator[int]:
    """A port on 127.0.0.1 whose connects never complete: a raylet out of touch."""
    with full_listener() as server:
        yield server.getsockname()[1]


@contextmanager
def full_listener() -> Iterator[socket.socket]:
    """A listener on 127.0.0.1 whose accept queue is full: it drops every further SYN, as a host out of touch leaves
    them unanswered, until what it queued is accepted (`drain`)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(0)
        held: list[socket.socket] = []
        try:
            for _ in range(16):  # the kernel queues a connection or two past a backlog of 0: fill them
                client = socket.socket()
                held.append(client)
                client.settimeout(0.5)
                try:
                    client.connect(server.getsockname())
                except TimeoutError:
                    break
            else:
                pytest.fail("the full listener kept accepting connections: no connect to leave unanswered")
            yield server
        finally:
            for client in held:
                client.close()


def drain(server: socket.socket) -> int:
    """Accept and close every connection `server` has queued; how many there were."""
    server.setblocking(False)
    made = 0
    while True:
        try:
            server.accept()[0].close()
        except BlockingIOError:
            return made
        made += 1


def answer(probe: RayletProbe, within_s: float = 30.0) -> RayletAnswer:
    """Ask `probe` each few milliseconds until it tells how its connect ended."""
    deadline = time.monotonic() + within_s
    while (got := probe.check(time.monotonic())) is None:
        assert time.monotonic() < deadline, f"the probe of {probe.where} told nothing within {within_s:.0f}s"
        time.sleep(0.01)
    return got


def test_a_raylet_probe_tells_a_live_raylet_a_gone_one_and_a_silent_one(listening: int, closed: int,
                                                                         silent: int) -> None:
    assert answer(RayletProbe("127.0.0.1", listening)) == "accepts"
    assert answer(RayletProbe("127.0.0.1", closed)) == "refuses"
    probe = RayletProbe("127.0.0.1", silent, timeout_s=0.3, every_s=0.0)
    assert probe.check(time.monotonic()) is None, "the connect in flight was waited for: it blocked the round"
    assert answer(probe) == "silent"  # a timeout: a blip, not a dead node
    assert answer(probe) == "silent", "the next round's connect"
    assert RayletProbe("fd00::2", 1).where == "[fd00::2]:1"
    assert RayletProbe("not-an-address", 1).check(time.monotonic()) is None  # nothing to ask: the grace decides


def test_a_raylet_probe_connects_at_most_once_per_period(listening: int) -> None:
    probe = RayletProbe("127.0.0.1", listening, every_s=3600.0)
    assert answer(probe) == "accepts"
    assert probe.check(time.monotonic()) is None, "a second connect within the period"


def healthy_until(deployment: RayDeployment, fake: ScriptedRay, run: RayRun, said: list[str],
                  within_s: float = 30.0) -> RayletProbe:
    """Supervision rounds of the healthy instance (its `serve` call running) until the connect asked of its node's
    raylet meanwhile has ended; that raylet's probe."""
    fake.pending.add("serve")
    probe = run.raylet
    assert probe is not None
    deadline = time.monotonic() + within_s
    while probe.last is None:
        deployment.tick()
        assert run.state == "ready" and time.monotonic() < deadline, said
        time.sleep(0.01)
    fake.pending.discard("serve")  # the next round sees serve failed: Ray lost touch with the actor
    return probe


def test_an_actor_whose_raylet_refuses_is_ended_at_once_naming_it(deployment: RayDeployment, fake: ScriptedRay,
                                                                   run: RayRun, said: list[str]) -> None:
    """Its node killed outright: Ray reports the actor unavailable, and its node's raylet, which accepted a
    connection from here while the instance was healthy, now refuses them."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(8)
        port = server.getsockname()[1]
        run.raylet = RayletProbe("127.0.0.1", port, every_s=0.0)  # its healthy-time connect long ago
        assert healthy_until(deployment, fake, run, said).last == "accepts"
    deployment.tick()  # the raylet is gone: nothing listens on its port any more
    assert run.state == "down" and run.unreachable is None, said
    assert not any("does not answer" in s for s in said), "a grace said for a node known gone"
    ended = [s for s in said if s.startswith("prefill-0 lost its Ray actor")]
    assert len(ended) == 1, said
    assert ended[0].startswith(f"prefill-0 lost its Ray actor on node {NODE}: its raylet at 127.0.0.1:{port} "
                               f"refuses connections: the node is gone (Ray: {SOCKET_CLOSED.strip()}"), ended
    assert "its actors and placement group are removed; restart 1" in ended[0], ended


def test_a_healthy_instance_s_raylet_is_asked_once(deployment: RayDeployment, fake: ScriptedRay, run: RayRun,
                                                   said: list[str]) -> None:
    """The connect that tells whether this host reaches the raylet: once one is accepted, a healthy node is not asked
    again."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(64)
        run.raylet = RayletProbe("127.0.0.1", server.getsockname()[1], every_s=0.0, retry_s=0.0)
        healthy_until(deployment, fake, run, said)
        fake.pending.add("serve")
        for _ in range(20):
            deployment.tick()
        assert run.state == "ready" and run.raylet.accepted, said
        made = drain(server)
    assert made == 1, f"{made} connects to a healthy node's raylet"


def healthy_answer(probe: RayletProbe, now: float, within_s: float = 30.0) -> RayletAnswer:
    """Ask `probe`, as a healthy instance's round does at `now`, each few milliseconds until its connect has ended."""
    deadline = time.monotonic() + within_s
    while (got := probe.check_healthy(now)) is None:
        assert time.monotonic() < deadline, f"the probe of {probe.where} told nothing within {within_s:.0f}s"
        time.sleep(0.01)
    return got


def test_a_raylet_not_seen_accepting_is_asked_again_while_healthy_until_it_accepts(
        closed: int, listening: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A healthy instance's raylet whose connect did not end accepted (refused, timed out: a blip at launch) is asked
    again, after retry_s, then twice as long each time up to retry_max_s, one connect at a time; once one is
    accepted it is not asked again while the instance is healthy."""
    made: list[object] = []
    real = socket.socket

    def counted(*args: object, **kwargs: object) -> socket.socket:
        made.append(args)
        return real(*args, **kwargs)  # type: ignore[arg-type]

    refusing = RayletProbe("127.0.0.1", closed, every_s=0.0, retry_s=2.0, retry_max_s=5.0)
    accepting = RayletProbe("127.0.0.1", listening, every_s=0.0, retry_s=2.0, retry_max_s=5.0)
    monkeypatch.setattr(ray_unreachable.socket, "socket", counted)
    now = 100.0
    assert healthy_answer(refusing, now) == "refuses" and len(made) == 1
    for wait in (2.0, 4.0, 5.0, 5.0):
        asked = len(made)
        assert refusing.check_healthy(now + wait - 0.01) is None and len(made) == asked, f"asked again before {wait}s"
        now += wait
        assert healthy_answer(refusing, now) == "refuses" and len(made) == asked + 1, f"not asked again after {wait}s"
    assert healthy_answer(accepting, now) == "accepts" and accepting.accepted
    asked = len(made)
    assert accepting.check_healthy(now + 3600.0) is None and len(made) == asked, "a raylet seen accepting asked again"


def test_a_raylet_silent_while_healthy_is_asked_again_then_its_refusal_ends_at_once(
        deployment: RayDeployment, fake: ScriptedRay, run: RayRun, said: list[str]) -> None:
    """A blip at launch: the connect to the raylet made while the instance was healthy timed out. The raylet is asked
    again while the instance serves; once it accepted, the node killed outright ends the instance at once, not after
    the whole grace."""
    with full_listener() as server:
        port = server.getsockname()[1]
        run.raylet = RayletProbe("127.0.0.1", port, timeout_s=0.3, every_s=0.0, retry_s=0.05, retry_max_s=0.2)
        assert healthy_until(deployment, fake, run, said).last == "silent"
        fake.pending.add("serve")  # still healthy; the blip is over: what the listener queued is accepted
        deadline = time.monotonic() + 30.0
        while not run.raylet.accepted:
            drain(server)
            deployment.tick()
            assert run.state == "ready", said
            assert time.monotonic() < deadline, f"a raylet silent once was not asked again (last: {run.raylet.last})"
            time.sleep(0.01)
        fake.pending.discard("serve")  # the next round sees serve failed: Ray lost touch with the actor
    deployment.tick()  # the raylet is gone: nothing listens on its port any more
    assert run.state == "down" and not any("does not answer" in s for s in said), said
    assert any(s.startswith(f"prefill-0 lost its Ray actor on node {NODE}: its raylet at 127.0.0.1:{port} refuses "
                            "connections: the node is gone") for s in said), said


@pytest.mark.parametrize("raylet", ["listening", "silent"])
def test_an_actor_whose_raylet_accepts_or_is_silent_keeps_the_grace(deployment: RayDeployment, fake: ScriptedRay,
                                                                     run: RayRun, said: list[str], raylet: str,
                                                                     request: pytest.FixtureRequest) -> None:
    fake.pending.add("node_address-1")
    run.raylet = RayletProbe("127.0.0.1", request.getfixturevalue(raylet))
    deadline = time.monotonic() + 30.0
    while run.unreachable is None or run.unreachable.raylet is None or run.unreachable.raylet.last is None:
        deployment.tick()  # until the raylet's first connect has ended
        assert run.state == "ready" and time.monotonic() < deadline, said
        time.sleep(0.01)
    assert run.unreachable.raylet.last == ("accepts" if raylet == "listening" else "silent")
    assert run.state == "ready" and not any("lost its Ray actor" in s for s in said), said
    assert len([s for s in said if "does not answer" in s]) == 1, said


@pytest.mark.parametrize("error", [errno.EAFNOSUPPORT, errno.EMFILE], ids=["EAFNOSUPPORT", "EMFILE"])
def test_a_raylet_probe_whose_socket_cannot_be_made_is_silent(monkeypatch: pytest.MonkeyPatch, error: int) -> None:
    """An IPv6 raylet address on a launcher host without IPv6 (EAFNOSUPPORT), or the launcher out of descriptors
    (EMFILE): no socket to connect with reads as a blip (the grace decides), not a crash of the supervision round."""
    def no_socket(*args: object, **kwargs: object) -> socket.socket:
        raise OSError(error, os.strerror(error))

    probe = RayletProbe("fd00::2", 1)
    monkeypatch.setattr(ray_unreachable.socket, "socket", no_socket)
    assert probe.check(time.monotonic()) == "silent"
    assert probe.check(time.monotonic() + 2 * ray_unreachable.RAYLET_PROBE_S) == "silent", "the next round's connect"
    lost = ray_unreachable.Unreachable(NODE, time.monotonic(), "why", raylet=RayletProbe("127.0.0.1", 1))
    assert lost.over(time.monotonic()) is None, "the grace runs"


def test_a_refusal_from_a_raylet_never_seen_accepting_keeps_the_grace(deployment: RayDeployment, fake: ScriptedRay,
                                                                      run: RayRun, said: list[str],
                                                                      closed: int) -> None:
    """A firewall that REJECTs (icmp-port-unreachable, tcp-reset) refuses every connect from here as a raylet gone
    would: a refusal is not trusted from a raylet that never accepted one from this host."""
    fake.pending.add("node_address-1")
    run.raylet = RayletProbe("127.0.0.1", closed)
    assert healthy_until(deployment, fake, run, said).last == "refuses"  # while the instance was healthy
    for _ in range(3):
        deployment.tick()
    assert run.state == "ready" and run.unreachable is not None, said
    assert run.unreachable.raylet is not None and run.unreachable.raylet.last == "refuses", "not asked during the grace"
    assert not any("lost its Ray actor" in s for s in said), said
    grace = [s for s in said if "does not answer" in s]
    assert len(grace) == 1 and grace[0].endswith(f"; its raylet at 127.0.0.1:{closed} has not accepted a connection "
                                                 "from here, so a refusal from it is not taken as the node gone"), said
    run.unreachable.since -= ray_unreachable.UNREACHABLE_GRACE_S
    deployment.tick()  # the plain grace ends it
    assert run.state == "down" and any(s.startswith(f"prefill-0 lost its Ray actor: on node {NODE} it has been "
                                                    "unreachable for") for s in said), said
