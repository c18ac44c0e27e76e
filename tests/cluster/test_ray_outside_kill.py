"""`--backend ray`: a proxy or an instance actor that a kill from outside ended is said as the local launcher says it
of a child (launcher/process.py OUTSIDE_SIGKILL): the OOM killer named, with `dmesg` / `journalctl -k`, or Ray's own
memory monitor where Ray says it killed the actor. Before, the proxy's line said "was killed by signal 9 (SIGKILL)"
alone, and an actor's death quoted Ray's paragraph cut at 300 characters.

The proxy is a real process killed with SIGKILL; the actors' deaths are Ray's own exception classes with the death
cause as Ray 2.60 words it (a worker SIGKILLed on a local cluster printed DIED_SIGKILL below)."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from ray.core.generated.common_pb2 import ActorDiedErrorContext  # noqa: E402 (after the importorskip)

from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed  # noqa: E402
from pdlaunch.launcher.process import ChildProcess  # noqa: E402
from tests.cluster.test_backend_failures_ray import FakeRay, deployment_on, ray, task_error  # noqa: E402
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


def test_an_actor_killed_from_outside_names_the_oom_killer_on_its_node(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    said: list[str] = []
    monkeypatch.setattr(deployment, "say", said.append)
    run = deployment.runs[0]
    run.state, run.serve_ref = "ready", "serve"  # type: ignore[assignment]
    fake.failures["serve"] = actor_died(DIED_SIGKILL)
    deployment.tick()
    assert run.state == "down", said
    line = next(s for s in said if s.startswith("prefill-0 lost its Ray actor"))
    assert ("lost its Ray actor (a SIGKILL pdlaunch did not send: most often the kernel's OOM killer on node 10.0.0.2 "
            "(`dmesg | grep -i oom` or `journalctl -k` there names the process;") in line, line
    assert "Some common causes" not in line, line

    fake.failures["serve"] = actor_died(DIED_RAY_OOM)
    run.serve_ref = "serve"  # type: ignore[assignment]
    how = deployment.actors.exit_of(run)
    assert how is not None and how.startswith("lost its Ray actor (killed by Ray's memory monitor: node 10.0.0.2 "
                                              "ran low on memory"), how
    assert "RAY_memory_usage_threshold" in how, how


def test_a_rank_actor_killed_from_outside_is_named_after_rank_0s_failure(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 0's watchdog raises naming the dead rank with Ray's death cause (distributed/ray_executor.py)."""
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    run = deployment.runs[0]
    run.serve_ref = "serve"  # type: ignore[assignment]
    gone = RuntimeError(f"TP rank 1 (Ray actor on 10.0.0.2) is gone (the actor or its node died: {DIED_SIGKILL})"[:300])
    fake.failures["serve"] = task_error("ray::RayInstance.serve()", gone)
    how = deployment.actors.exit_of(run)
    assert how is not None and how.startswith("failed in its Ray actor (RuntimeError: TP rank 1"), how
    assert "; that actor ended by a SIGKILL pdlaunch did not send: most often the kernel's OOM killer" in how, how


def test_an_actor_that_raised_or_lost_its_node_names_no_oom_killer(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    run = deployment.runs[0]
    for failure in (actor_died("The actor died because its node has died. Node Id: 6f1c"),
                    task_error("ray::RayInstance.serve()", RuntimeError("CUDA error: out of memory"))):
        run.serve_ref = "serve"  # type: ignore[assignment]
        fake.failures["serve"] = failure  # type: ignore[assignment]
        how = deployment.actors.exit_of(run)
        assert how is not None and "OOM killer" not in how and "memory monitor" not in how, how


def _proxy_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[object, list[str]]:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    said: list[str] = []
    proxy = deployment.proxy
    proxy.say = said.append
    (tmp_path / "logs").mkdir(exist_ok=True)
    proxy.process = ChildProcess("proxy", ["sleep", "60"], tmp_path / "logs" / "proxy.log")
    proxy.process.start()
    proxy.record.ready, proxy.record.started = True, 0.0
    return deployment, said


def _ended(process: ChildProcess) -> None:
    wait_for(lambda: process.poll() is not None, "the proxy process to end", 30.0, poll=0.05)


def test_a_proxy_killed_from_outside_names_the_oom_killer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, said = _proxy_of(tmp_path, monkeypatch)
    proxy = deployment.proxy  # type: ignore[attr-defined]
    os.kill(proxy.process.pid, signal.SIGKILL)  # the OOM killer's signal, not the launcher's
    _ended(proxy.process)
    proxy.check(deployment.runs, 10.0, deployment.policy)  # type: ignore[attr-defined]
    assert len(said) == 1 and said[0].startswith("the proxy was killed by signal 9 (SIGKILL); restarting it"), said
    assert "(a SIGKILL pdlaunch did not send: most often the kernel's OOM killer (`dmesg | grep -i oom` or " \
           "`journalctl -k`" in said[0], said


def test_a_proxy_that_fails_for_good_by_an_outside_kill_says_so(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, said = _proxy_of(tmp_path, monkeypatch)
    proxy = deployment.proxy  # type: ignore[attr-defined]
    proxy.record.ready, proxy.record.outage_cause = False, "exited with code 1"  # then restarts never answered
    proxy.record.failures = deployment.policy.max_restarts - 1  # type: ignore[attr-defined]
    os.kill(proxy.process.pid, signal.SIGKILL)
    _ended(proxy.process)
    with pytest.raises(RayDeploymentFailed) as failed:
        proxy.check(deployment.runs, 10.0, deployment.policy)  # type: ignore[attr-defined]
    assert "; it ended by a SIGKILL pdlaunch did not send: most often the kernel's OOM killer" in failed.value.message


def test_a_proxy_the_launcher_killed_names_no_oom_killer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, said = _proxy_of(tmp_path, monkeypatch)
    proxy = deployment.proxy  # type: ignore[attr-defined]
    proxy.process.signal_group(signal.SIGKILL)  # a stall's or a start's kill: the launcher's own
    _ended(proxy.process)
    proxy.check(deployment.runs, 10.0, deployment.policy)  # type: ignore[attr-defined]
    assert len(said) == 1 and "OOM killer" not in said[0], said


def test_a_proxy_killed_from_outside_while_starting_names_the_oom_killer(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    deployment, said = _proxy_of(tmp_path, monkeypatch)
    proxy = deployment.proxy  # type: ignore[attr-defined]
    monkeypatch.setattr(proxy, "answers", lambda: False)
    os.kill(proxy.process.pid, signal.SIGKILL)
    _ended(proxy.process)
    with pytest.raises(RayDeploymentFailed) as failed:
        proxy.wait_ready(float("inf"), lambda: False)
    assert failed.value.message.startswith("the proxy was killed by signal 9 (SIGKILL) while starting (a SIGKILL "
                                           "pdlaunch did not send: most often the kernel's OOM killer"), \
        failed.value.message
