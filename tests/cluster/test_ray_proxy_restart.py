"""`--backend ray`: the proxy is started once per restart. An instance that comes back at another node's address
while the proxy waits out its restart backoff (the proxy had exited) is handed to the proxy by that restart,
which reads every instance's current address. Before, the instance's move started the proxy at once and the
backoff's restart then stopped that serving proxy (1 s, no drain: its requests cut) to start it again.
Stand-ins for the ray module and the proxy's process."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.launcher.backends import ray_proxy  # noqa: E402 (after the importorskip)
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on  # noqa: E402


class _Proxy:
    """The proxy's ChildProcess: `exited` is its exit code once it ended; `events` what the launcher did to it."""

    events: list[str] = []
    pid = 4242

    def __init__(self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None,
                 tmp_dir_flag: str | None = None) -> None:
        self.argv, self.log_path, self.exited = argv, log_path, None
        _Proxy.events.clear()

    def start(self, note: str | None = None) -> None:
        self.exited = None
        _Proxy.events.append(f"start ({note})" if note else "start")

    def stop(self, term_timeout: float, hurry: object = None) -> None:
        if self.exited is None:
            _Proxy.events.append("stopped while serving")
        self.exited = -15

    def poll(self) -> int | None:
        return self.exited

    def describe_exit(self) -> str:
        return f"exited with code {self.exited}"

    def outside_kill(self) -> str | None:
        return None  # every SIGKILL here is the launcher's (signal_group)

    def signal_group(self, sig: int) -> None:
        _Proxy.events.append(f"signal {sig}")
        if self.exited is None:  # a reaped leader's exit stays what it was (the SIGKILL reaches its group's rest)
            self.exited = -sig


@pytest.mark.parametrize("exit_seen", [True, False], ids=["in-backoff", "exit-not-yet-seen"])
def test_an_instance_that_moved_while_the_proxy_was_down_gets_one_proxy_restart(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, exit_seen: bool) -> None:
    """`exit-not-yet-seen`: the proxy exited in the same round, before proxy.check saw it: the move restarted it
    at once and its exit never reached the restart policy (its backoff and supervision.max_restarts)."""
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    monkeypatch.setattr(ray_proxy, "ChildProcess", _Proxy)
    monkeypatch.setattr(deployment.proxy, "answers", lambda: True)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    for port, run in enumerate(deployment.runs, start=9000):
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2", "port": port})
        run.state = "ready"
    proxy = deployment.proxy
    proxy.start(deployment.runs, note=None)
    assert isinstance(proxy.process, _Proxy)
    proxy.record.ready = True

    proxy.process.exited = 1  # the proxy exits: its restart is due after the backoff
    if exit_seen:
        proxy.check(deployment.runs, now=100.0, policy=deployment.policy)

    decode = deployment.runs[1]  # meanwhile decode-0 came back on another node
    decode.spec = decode.plan.spec.model_copy(update={"host": "10.0.0.3", "port": 9001})
    decode.state = "starting"
    monkeypatch.setattr(deployment, "answers", lambda run: True)
    deployment._check_started(decode, now=100.5)
    if not exit_seen:
        proxy.check(deployment.runs, now=100.5, policy=deployment.policy)
    due = proxy.record.due
    assert due is not None and due > 100.0 and proxy.record.last_exit == "exited with code 1", said
    proxy.check(deployment.runs, now=due, policy=deployment.policy)
    proxy.check(deployment.runs, now=due + 1.0, policy=deployment.policy)

    # its group killed once its exit is seen (RayProxy.check reaps it as Supervisor._ended does), then one restart
    assert _Proxy.events == ["start", f"signal {int(signal.SIGKILL)}", "start (restart 1 of the proxy (exited with "
                             "code 1))"], (_Proxy.events, said)
    assert proxy.urls["decode-0"] == "http://10.0.0.3:9001" and proxy.record.restarts == 1


def test_a_proxy_restarted_for_a_move_is_starting_until_it_answers(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The proxy started again with an instance's new address is a new process that loads: not live, not watched for
    stalls, and killed when not ready in time, which counts as a failed restart (supervision.max_restarts), as after
    any restart. Before, it kept the old process's "ready": its /health unanswered while it started was called a
    stall (and killed after supervision.stall_restart_seconds, each such kill a restart of a ready proxy, never
    counted), and one that never answered stayed "live" for the role watch."""
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    monkeypatch.setattr(ray_proxy, "ChildProcess", _Proxy)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    stall_checks: list[str] = []

    def stalled(pid: int | None, url: str) -> str:  # what the stall watch says of a proxy that does not answer
        stall_checks.append(url)
        return "was stalled for 5s (no /health answer; supervision.stall_restart_seconds: 5)"

    monkeypatch.setattr(deployment.stalls, "check_proxy", stalled)
    for port, run in enumerate(deployment.runs, start=9000):
        run.spec = run.plan.spec.model_copy(update={"host": "10.0.0.2", "port": port})
        run.state = "ready"
    proxy = deployment.proxy
    proxy.start(deployment.runs, note=None)
    proxy.record.ready, proxy.record.failures = True, 1  # a restart failed once, then one answered

    decode = deployment.runs[1]  # decode-0 comes back on another node: the proxy starts again with its address
    decode.spec = decode.plan.spec.model_copy(update={"host": "10.0.0.3", "port": 9001})
    decode.state = "starting"
    monkeypatch.setattr(deployment, "answers", lambda run: True)
    deployment._check_started(decode, now=100.0)
    assert _Proxy.events == ["start", "stopped while serving", "start (decode-0 moved to http://10.0.0.3:9001)"]
    assert not proxy.live

    monkeypatch.setattr(proxy, "answers", lambda: False)  # the new process never answers
    for now in (101.0, 150.0, 100.0 + ray_proxy.READY_TIMEOUT_S):
        proxy.check(deployment.runs, now=now, policy=deployment.policy)
    assert stall_checks == [] and _Proxy.events[3:] == [], (_Proxy.events, said)
    proxy.check(deployment.runs, now=101.0 + ray_proxy.READY_TIMEOUT_S, policy=deployment.policy)
    assert _Proxy.events[3:] == [f"signal {int(signal.SIGKILL)}"], _Proxy.events
    assert any(line.startswith(f"the proxy is not ready {ray_proxy.READY_TIMEOUT_S:.0f}s after its last start "
                               "(decode-0 moved to http://10.0.0.3:9001); killing it") for line in said), said
    proxy.check(deployment.runs, now=102.0 + ray_proxy.READY_TIMEOUT_S, policy=deployment.policy)
    # a failed restart, the first in a row: the restart that answered before the move ended the last row
    assert proxy.record.failures == 1 and proxy.record.due is not None, said
    assert proxy.record.outage_cause == "was started again: decode-0 moved to http://10.0.0.3:9001", proxy.record
    assert stall_checks == [], said
