"""`--backend ray`: a proxy or an instance actor that a kill from outside ended is said as the local launcher says it
of a child (launcher/process.py OUTSIDE_SIGKILL): the OOM killer named, with `dmesg` / `journalctl -k`, or Ray's own
memory monitor where Ray says it killed the actor. Before, the proxy's line said "was killed by signal 9 (SIGKILL)"
alone, and an actor's death quoted Ray's paragraph cut at 300 characters.

The proxy is a real process killed with SIGKILL; the actors' deaths are Ray's own exception classes with the death
cause as Ray 2.60 words it (a worker SIGKILLed on a local cluster printed DIED_SIGKILL below). Ray's own paragraph
for a dead worker, which every driver printed beside the launcher's line, is dropped (ray_killed.quiet_worker_deaths).
One stand-in deployment per test (the fixtures), stopped after it."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from ray.core.generated.common_pb2 import ActorDiedErrorContext  # noqa: E402 (after the importorskip)

from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from pdlaunch.launcher.backends.ray_killed import quiet_worker_deaths  # noqa: E402
from pdlaunch.launcher.backends.ray_proxy import RayProxy  # noqa: E402
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed  # noqa: E402
from pdlaunch.launcher.process import ChildProcess  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, ray, running_on, task_error  # noqa: E402
from tests.serving.helpers import wait_for  # noqa: E402

DIED_SIGKILL = (
    "The actor is dead because its worker process has died. Worker exit type: SYSTEM_ERROR Worker exit detail: "
    "Worker unexpectedly exits with a connection error code 2. End of file. Some common causes include: (1) the "
    "process was killed by the OOM killer due to high memory usage, (2) ray stop --force was called, or (3) the "
    "worker crashed unexpectedly due to SIGSEGV or another unexpected error. If the process was killed by the kernel "
    "OOM killer (verifiable by checking for OOM in dmesg of the OOMing node), consider enabling resource isolation "
    "via --enable-resource-isolation to prevent node deaths by resource contention and significant loss of progress "
    "by uninformed kernel OOM killing.")
DIED_RAY_OOM = (
    "The actor is dead because its worker process has died. Worker exit type: NODE_OUT_OF_MEMORY Worker exit "
    "detail: Task was killed due to the node running low on memory. Memory on the node (IP: 10.0.0.2, ID: 6f1c) "
    "was 61.2GB used / 64.0GB limit (0.956)")


def actor_died(error_message: str) -> object:
    context = ActorDiedErrorContext(error_message=error_message, class_name="RayInstance", actor_id=b"\x01" * 16,
                                    pid=4243, node_ip_address="10.0.0.2")
    return ray.exceptions.ActorDiedError(context)


@pytest.fixture
def fake() -> FakeRay:
    return FakeRay()


@pytest.fixture
def deployment(fake: FakeRay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[RayDeployment]:
    """A deployment of one prefill and one decode on `fake`, its proxy not started; stopped after the test (its proxy
    killed, its ports given back)."""
    with running_on(fake, tmp_path, monkeypatch) as made:
        yield made


@pytest.fixture
def said(deployment: RayDeployment, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """What the deployment and its proxy say."""
    lines: list[str] = []
    monkeypatch.setattr(deployment, "say", lines.append)
    deployment.proxy.say = lines.append
    return lines


@pytest.fixture
def proxy(deployment: RayDeployment, said: list[str], tmp_path: Path) -> RayProxy:
    """The deployment's proxy: a real process (`sleep 60`), ready (the deployment's stop kills it)."""
    proxy = deployment.proxy
    (tmp_path / "logs").mkdir(exist_ok=True)
    proxy.process = ChildProcess("proxy", ["sleep", "60"], tmp_path / "logs" / "proxy.log")
    proxy.process.start()
    proxy.record.ready, proxy.record.started = True, 0.0
    return proxy


def test_an_actor_killed_from_outside_names_the_oom_killer_on_its_node(fake: FakeRay, deployment: RayDeployment,
                                                                       said: list[str]) -> None:
    run = deployment.runs[0]
    run.state, run.serve_ref = "ready", "serve"  # type: ignore[assignment]
    fake.failures["serve"] = actor_died(DIED_SIGKILL)  # type: ignore[assignment]
    deployment.tick()
    assert run.state == "down", said
    line = next(s for s in said if s.startswith("prefill-0 lost its Ray actor"))
    assert ("lost its Ray actor (a SIGKILL pdlaunch did not send: most often the kernel's OOM killer on node 10.0.0.2 "
            "(`dmesg | grep -i oom` or `journalctl -k` there names the process;") in line, line
    assert "Some common causes" not in line, line

    fake.failures["serve"] = actor_died(DIED_RAY_OOM)  # type: ignore[assignment]
    run.serve_ref = "serve"  # type: ignore[assignment]
    how = deployment.actors.exit_of(run)
    assert how is not None and how.startswith("lost its Ray actor (killed by Ray's memory monitor: node 10.0.0.2 "
                                              "ran low on memory"), how
    assert "RAY_memory_usage_threshold" in how, how


def test_a_rank_actor_killed_from_outside_is_named_after_rank_0s_failure(fake: FakeRay,
                                                                         deployment: RayDeployment) -> None:
    """Rank 0's watchdog raises naming the dead rank with Ray's death cause (distributed/ray_executor.py)."""
    run = deployment.runs[0]
    run.serve_ref = "serve"  # type: ignore[assignment]
    gone = RuntimeError(f"TP rank 1 (Ray actor on 10.0.0.2) is gone (the actor or its node died: {DIED_SIGKILL})"[:300])
    fake.failures["serve"] = task_error("ray::RayInstance.serve()", gone)
    how = deployment.actors.exit_of(run)
    assert how is not None and how.startswith("failed in its Ray actor (RuntimeError: TP rank 1"), how
    assert "; that actor ended by a SIGKILL pdlaunch did not send: most often the kernel's OOM killer" in how, how


def test_an_actor_that_raised_or_lost_its_node_names_no_oom_killer(fake: FakeRay, deployment: RayDeployment) -> None:
    run = deployment.runs[0]
    for failure in (actor_died("The actor died because its node has died. Node Id: 6f1c"),
                    task_error("ray::RayInstance.serve()", RuntimeError("CUDA error: out of memory"))):
        run.serve_ref = "serve"  # type: ignore[assignment]
        fake.failures["serve"] = failure  # type: ignore[assignment]
        how = deployment.actors.exit_of(run)
        assert how is not None and "OOM killer" not in how and "memory monitor" not in how, how


DIED_IN_ITS_CONSTRUCTOR = f"{DIED_SIGKILL}\nThe actor never ran - it was cancelled before it started running."


def test_an_actor_killed_from_outside_in_its_constructor_names_the_oom_killer(fake: FakeRay, deployment: RayDeployment,
                                                                              said: list[str]) -> None:
    """Rank 0's actor SIGKILLed while Ray built it (before the instance answered): Ray 2.60 gives the same death cause
    as for a running actor (not a failed constructor: actor_init_failed is false), with "never ran" after it."""
    run = deployment.runs[0]
    run.state, run.serve_ref = "starting", "serve"  # type: ignore[assignment]
    fake.failures["serve"] = actor_died(DIED_IN_ITS_CONSTRUCTOR)  # type: ignore[assignment]
    deployment.tick()
    line = next(s for s in said if s.startswith("prefill-0 "))
    assert line.startswith("prefill-0 lost its Ray actor (a SIGKILL pdlaunch did not send: most often the kernel's OOM "
                           "killer on node 10.0.0.2"), line


class RankActor:
    """A rank actor's handle as exit_of calls it: `node_address.remote()` gives the ref `ref`."""

    def __init__(self, ref: str) -> None:
        self.node_address = type("Method", (), {"remote": staticmethod(lambda: ref)})()


class ExitingRay(FakeRay):
    """`serve` returns `code` (rank 0 exited so: a rank's actor died under it)."""

    def __init__(self, code: int) -> None:
        super().__init__()
        self.code = code

    def get(self, ref: str) -> int:
        return self.code if ref == "serve" and ref not in self.failures else super().get(ref)


@pytest.mark.parametrize("death", [DIED_SIGKILL, DIED_IN_ITS_CONSTRUCTOR], ids=["serving", "in its constructor"])
def test_a_rank_actor_killed_from_outside_is_named_where_rank_0_exits(death: str, deployment: RayDeployment,
                                                                       said: list[str],
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A rank's actor dies (built or serving): rank 0's engine fails and `serve` returns 1, which said "exited with
    code 1" alone (tests/cluster/test_ray.py saw it on a real cluster); the dead rank's actor is asked now, and Ray's
    death cause it answers with names the kill."""
    exiting = ExitingRay(1)
    monkeypatch.setattr(deployment.actors, "ray", exiting)
    run = deployment.runs[1]
    run.state, run.serve_ref = "ready", "serve"  # type: ignore[assignment]
    run.actors = [RankActor("node-0"), RankActor("node-1"), RankActor("node-2")]
    exiting.failures["node-2"] = actor_died(death)  # type: ignore[assignment]
    deployment.tick()
    line = next(s for s in said if s.startswith("decode-0 "))
    assert line.startswith("decode-0 exited with code 1 (its TP rank 2 actor ended by a SIGKILL pdlaunch did not send: "
                           "most often the kernel's OOM killer on node 10.0.0.2"), line

    exiting.failures["node-2"] = actor_died("The actor died because its node has died. Node Id: 6f1c")  # type: ignore[assignment]
    run.serve_ref = "serve"  # type: ignore[assignment]
    run.actors = [RankActor("node-0"), RankActor("node-1"), RankActor("node-2")]
    assert deployment.actors.exit_of(run) == "exited with code 1"  # not killed from outside: rank 0's log says it


def _ended(process: ChildProcess) -> None:
    wait_for(lambda: process.poll() is not None, "the proxy process to end", 30.0, poll=0.05)


def test_a_proxy_killed_from_outside_names_the_oom_killer(deployment: RayDeployment, proxy: RayProxy,
                                                          said: list[str]) -> None:
    assert proxy.process is not None
    os.kill(proxy.process.pid, signal.SIGKILL)  # the OOM killer's signal, not the launcher's
    _ended(proxy.process)
    proxy.check(deployment.runs, 10.0, deployment.policy)
    assert len(said) == 1 and said[0].startswith("the proxy was killed by signal 9 (SIGKILL); restarting it"), said
    assert "(a SIGKILL pdlaunch did not send: most often the kernel's OOM killer (`dmesg | grep -i oom` or " \
           "`journalctl -k`" in said[0], said


def test_a_proxy_that_fails_for_good_by_an_outside_kill_says_so(deployment: RayDeployment, proxy: RayProxy) -> None:
    assert proxy.process is not None
    proxy.record.ready, proxy.record.outage_cause = False, "exited with code 1"  # then restarts never answered
    proxy.record.failures = deployment.policy.max_restarts - 1
    os.kill(proxy.process.pid, signal.SIGKILL)
    _ended(proxy.process)
    with pytest.raises(RayDeploymentFailed) as failed:
        proxy.check(deployment.runs, 10.0, deployment.policy)
    assert "; it ended by a SIGKILL pdlaunch did not send: most often the kernel's OOM killer" in failed.value.message


def test_a_proxy_the_launcher_killed_names_no_oom_killer(deployment: RayDeployment, proxy: RayProxy,
                                                         said: list[str]) -> None:
    assert proxy.process is not None
    proxy.process.signal_group(signal.SIGKILL)  # a stall's or a start's kill: the launcher's own
    _ended(proxy.process)
    proxy.check(deployment.runs, 10.0, deployment.policy)
    assert len(said) == 1 and "OOM killer" not in said[0], said


def test_a_proxy_killed_from_outside_while_starting_names_the_oom_killer(proxy: RayProxy,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert proxy.process is not None
    monkeypatch.setattr(proxy, "answers", lambda: False)
    os.kill(proxy.process.pid, signal.SIGKILL)
    _ended(proxy.process)
    with pytest.raises(RayDeploymentFailed) as failed:
        proxy.wait_ready(float("inf"), lambda: False)
    assert failed.value.message.startswith("the proxy was killed by signal 9 (SIGKILL) while starting (a SIGKILL "
                                           "pdlaunch did not send: most often the kernel's OOM killer"), \
        failed.value.message


RAYLET_SAYS_WORKER_DIED = (
    "A worker died or was killed while executing a task by an unexpected system error. To troubleshoot the problem, "
    "check the logs for the dead worker. Lease ID: 0600 Worker ID: 7a45 Node ID: bf51 Worker IP address: 127.0.0.3 "
    f"Worker port: 11640 Worker PID: 3251 {DIED_SIGKILL.split('. ', 1)[1]}")
RAYLET_SAYS_NODE_DEAD = ("The node with node id: 03b7 and address: 127.0.0.2 and node name: 127.0.0.2 has been marked "
                         "dead because the detector has missed too many heartbeats from it.")


def test_rays_own_paragraph_for_a_dead_worker_is_not_printed_beside_the_launchers_line(
        fake: FakeRay, deployment: RayDeployment, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The driver prints what its raylets publish (ray._private.worker.listen_error_messages, whatever log_to_driver
    says): a worker's death came out as Ray's paragraph beside the launcher's own line (tests/cluster/test_ray.py sees
    it on a real cluster). The deployment's connect drops those; Ray's other messages are printed as before."""
    worker = ray._private.worker
    monkeypatch.setattr(worker, "print_to_stdstream", worker.print_to_stdstream)  # given back after the test
    monkeypatch.setattr(fake, "_private", ray._private, raising=False)  # the deployment's ray is the real one here
    quiet_worker_deaths(fake)
    quiet_worker_deaths(fake)  # a second deployment in the process: wrapped once
    capsys.readouterr()
    for message in (RAYLET_SAYS_WORKER_DIED, RAYLET_SAYS_NODE_DEAD,
                    "3 worker(s) were killed due to the node running low on memory. Refer to the documentation"):
        # as listen_error_messages calls it (the global name: what it finds at each call)
        worker.print_to_stdstream({"lines": [message], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    out = capsys.readouterr().out
    assert "A worker died" not in out and "running low on memory" not in out, out
    assert out.count("has been marked dead because the detector has missed") == 1, out


@pytest.mark.parametrize("failure", ["raised", "ray error"])
def test_a_rank_whose_address_call_failed_otherwise_is_named(failure: str, deployment: RayDeployment,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0 exited with code 1 and rank 2's `node_address` call failed with an error other than its actor's death:
    a RayTaskError (the call raised) or another RayError escaped exit_of, and the launcher's tick, as a traceback."""
    exiting = ExitingRay(1)
    monkeypatch.setattr(deployment.actors, "ray", exiting)
    run = deployment.runs[1]
    run.serve_ref = "serve"  # type: ignore[assignment]
    run.actors = [RankActor("node-0"), RankActor("node-1"), RankActor("node-2")]
    exiting.failures["node-2"] = (task_error("ray::RayRank.node_address()", OSError("no route to host"))  # type: ignore[assignment]
                                  if failure == "raised" else ray.exceptions.RaySystemError("the raylet went away"))
    cause = "OSError: no route to host" if failure == "raised" else "System error: the raylet went away"
    assert deployment.actors.exit_of(run) == f"exited with code 1 (its TP rank 2 actor failed ({cause}))"
