"""`--backend ray` when the cluster fails the deployment at run time (launcher/backends/ray*.py,
distributed/ray_executor.py): what the launcher says and what it leaves behind. Fast: Ray's own exception
classes (their messages as Ray 2.x builds them) and stand-ins for the ray module; no cluster.

- an actor whose constructor raised, a serve call that raised, an actor whose node died: the message
  names the cause (the remote exception, the node's death), not Ray's headline (pid, actor_id, colours);
- the head (GCS) gone: the launcher stops with its error naming the address within
  ray_head.LOST_S, before Ray ends the process, and does not block on Ray calls while stopping;
- a TP rank whose setup failed: named as it fails when rank 0 waits for the ranks to come to the join, and
  rank 0's rendezvous timeout reported as that rank's failure after it;
- a second Ctrl-C while the instances stop: the wait for them ends at once and their actors are killed
  (tests/cluster/test_ray_stop.py shows it on a real cluster).
"""

from __future__ import annotations

import io
import socket
import sys
import traceback
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import torch
from rich.console import Console

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.config.ray_cluster import RayNode
from pdlaunch.distributed.parallel_state import SealedStore, create_store, joining_key, store_key
from pdlaunch.distributed.ray_rank import ray_failure
from pdlaunch.errors import EngineError

ray = pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from ray.core.generated.common_pb2 import ActorDiedErrorContext  # noqa: E402 (after the importorskip)

from pdlaunch.distributed import ray_executor  # noqa: E402
from pdlaunch.launcher.backends import ray as backend  # noqa: E402
from pdlaunch.launcher.backends import ray_deployment, ray_head  # noqa: E402
from pdlaunch.launcher.process import HURRY_POLL_S  # noqa: E402

NODES = [RayNode("h", "10.0.0.1", {"CPU": 2.0}), RayNode("w", "10.0.0.2", {"CPU": 2.0})]


def task_error(function: str, cause: Exception, as_raised: bool = True) -> Any:
    """The exception Ray raises in the driver when remote code raised `cause` (as Ray builds it: an
    instance of both RayTaskError and the cause's class)."""
    try:
        raise cause
    except Exception:
        trace = traceback.format_exc()
    error = ray.exceptions.RayTaskError(function, trace, cause, pid=4242, ip="10.0.0.2")
    return error.as_instanceof_cause() if as_raised else error


def creation_error(cause: Exception) -> Any:
    """An actor whose constructor raised `cause`."""
    return ray.exceptions.ActorDiedError(task_error("ray::RayInstance.__init__()", cause, as_raised=False))


def node_died() -> Any:
    context = ActorDiedErrorContext(error_message="The actor died because its node has died. Node Id: 6f1c",
                                    class_name="RayRank", actor_id=b"\x01" * 16, pid=4243,
                                    node_ip_address="10.0.0.2")
    return ray.exceptions.ActorDiedError(context)


def test_a_ray_failure_is_named_by_its_cause() -> None:
    """Ray's first line is `ray::X.serve() (pid=.., ip=.., actor_id=..)` or `The actor died because of an
    error raised in its creation task, ...`: the launcher quoted that (with colour codes), not the cause."""
    raised = task_error("ray::RayInstance.serve()", ValueError("engine exploded\nsecond line"))
    assert ray_failure(raised) == "ValueError: engine exploded"
    missing = FileNotFoundError(2, "No such file or directory")
    missing.filename = "/shared/logs/prefill-0.log"
    assert ray_failure(creation_error(missing)) == \
        "FileNotFoundError: [Errno 2] No such file or directory: '/shared/logs/prefill-0.log'"
    assert ray_failure(node_died()) == "The actor died because its node has died. Node Id: 6f1c"
    assert ray_failure(ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")) == \
        "Get timed out: some object(s) not ready."


class FakeRay(types.ModuleType):
    """The ray module as the launcher uses it: `get` raises what `failures` holds for a ref."""

    exceptions = ray.exceptions

    def __init__(self, gcs_address: str | None = None) -> None:
        super().__init__("ray")
        self.failures: dict[str, BaseException] = {}
        self.calls: list[str] = []
        self.util = types.SimpleNamespace(remove_placement_group=self._blocks)
        if gcs_address is not None:
            self.get_runtime_context = lambda: types.SimpleNamespace(gcs_address=gcs_address)

    def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None) -> tuple[list[str], list[str]]:
        self.calls.append("wait")
        return list(refs), []

    def get(self, ref: str) -> int:
        if ref in self.failures:
            raise self.failures[ref]
        return 0

    def kill(self, actor: object, no_restart: bool = True) -> None:
        self.calls.append("kill")

    def shutdown(self) -> None:
        self.calls.append("shutdown")

    def _blocks(self, pg: object) -> None:
        raise AssertionError("remove_placement_group asks the GCS: with the head gone it blocks until Ray "
                             "ends the process")


def ray_cfg(tmp_path: Path) -> DeploymentConfig:
    return DeploymentConfig.model_validate({
        "device": "cpu", "launcher": {"backend": "ray"}, "proxy": {"port": 0}, "log_dir": str(tmp_path / "logs"),
        "instances": [{"role": "prefill", "tp": 1}, {"role": "decode", "tp": 1}]})


def deployment_on(fake: FakeRay, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> ray_deployment.RayDeployment:
    monkeypatch.setattr(ray_deployment, "connect", lambda cfg: fake)
    monkeypatch.setattr(ray_deployment, "live_nodes", lambda ray_module: NODES)
    return ray_deployment.RayDeployment(ray_cfg(tmp_path), Console(file=io.StringIO()))


@contextmanager
def running_on(fake: FakeRay, tmp_path: Path,
               monkeypatch: pytest.MonkeyPatch) -> Iterator[ray_deployment.RayDeployment]:
    """`deployment_on`, stopped when the block ends (its proxy killed, its ports given back)."""
    made = deployment_on(fake, tmp_path, monkeypatch)
    try:
        yield made
    finally:
        made.stop(drain=False, hurry=lambda: True)


def test_how_an_instance_ended_names_the_cause(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    run = deployment.runs[0]
    run.serve_ref = "serve"  # type: ignore[assignment]
    missing = FileNotFoundError(2, "No such file or directory")
    missing.filename = "/shared/logs/prefill-0.log"
    fake.failures["serve"] = creation_error(missing)
    assert deployment.actors.exit_of(run) == ("could not start its Ray actor (FileNotFoundError: [Errno 2] No such "
                                              "file or directory: '/shared/logs/prefill-0.log')")
    fake.failures["serve"] = task_error("ray::RayInstance.serve()", RuntimeError("CUDA error: out of memory"))
    assert deployment.actors.exit_of(run) == "failed in its Ray actor (RuntimeError: CUDA error: out of memory)"
    fake.failures["serve"] = node_died()
    assert deployment.actors.exit_of(run) == \
        "lost its Ray actor (The actor died because its node has died. Node Id: 6f1c)"
    del fake.failures["serve"]
    assert deployment.actors.exit_of(run) == "exited with code 0"


@pytest.fixture
def closed_address() -> Iterator[str]:
    """HOST:PORT where nothing listens (a head whose GCS died)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield f"127.0.0.1:{port}"


def test_a_lost_head_is_noticed_after_the_grace_only(closed_address: str) -> None:
    with socket.socket() as listening:
        listening.bind(("127.0.0.1", 0))
        listening.listen()
        watch = ray_head.HeadWatch(f"127.0.0.1:{listening.getsockname()[1]}")
        assert watch.check(now=0.0) is None
    # the socket is closed now: refused from here on
    assert watch.check(now=10.0) is None  # down since 10 s
    assert watch.check(now=10.0 + ray_head.PROBE_S) is None  # within the grace (a GCS restarting)
    lost = watch.check(now=10.0 + ray_head.LOST_S)
    assert lost is not None and "has not accepted a connection for 15s" in lost and watch.lost
    assert ray_head.HeadWatch("not an address").check(now=100.0) is None  # nothing to probe: left to Ray


@pytest.mark.timeout(60)  # without the watch it would run until the role-down grace (120 s)
def test_a_lost_head_stops_the_deployment_with_our_error(closed_address: str, tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """The GCS stops answering while serving: before, the launcher went on until Ray ended it ~60 s later
    with a fatal log line of its own (and its cleanup blocked on remove_placement_group until then)."""
    monkeypatch.setattr(ray_head, "LOST_S", 0.0)
    fake = FakeRay(gcs_address=closed_address)
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    deployment.runs[0].pg = object()  # type: ignore[assignment]  # a placement group that was placed
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    monkeypatch.setattr(type(deployment), "start", lambda self, should_stop: True)
    monkeypatch.setattr(backend, "POLL_S", 0.01)

    assert backend.run_ray(ray_cfg(tmp_path)) == 1
    text = " ".join(capsys.readouterr().out.split())
    assert f"launcher.ray_address: the Ray cluster's head is gone: its GCS at {closed_address}" in text, text
    assert "start the cluster again" in text and "Traceback" not in text, text
    assert "wait" not in fake.calls and fake.calls[-1] == "shutdown", fake.calls


class FakeActor:
    """A rank actor handle: each call's ref is "<method>-<rank>"."""

    def __init__(self, rank: int) -> None:
        for method in ("setup", "until_shutdown", "shutdown", "node_address"):
            call = types.SimpleNamespace(remote=lambda *a, m=method: f"{m}-{rank}")
            call.options = lambda m=method, **kw: types.SimpleNamespace(remote=lambda: f"{m}-{rank}")
            setattr(self, method, call)


class Join:
    """build_rank as rank 0 calls it: records that rank 0 entered its join, where it would wait for every rank."""

    def __init__(self) -> None:
        self.entered = False

    def __call__(self, *args: object) -> None:
        self.entered = True
        raise EngineError("TP rank 0 could not join the group within 60s: timeout", field="parallel.master_addr")


def rank0_on(fake: FakeRay, came: tuple[int, ...], build_rank: Join, monkeypatch: pytest.MonkeyPatch, tp: int = 2
             ) -> ray_executor.RayTPExecutor:
    """Rank 0 of a TP-`tp` instance under Ray, whose ranks `came` have come to the join (set their joining key,
    through the seal every rank derives from the config)."""
    monkeypatch.setitem(sys.modules, "ray", fake)
    config = DeploymentConfig()
    spec = InstanceSpec(role="decode", port=8200, tp=tp, engine_id="e")
    store = create_store("127.0.0.1", None, tp)
    for rank in came:
        SealedStore(store, store_key(config, spec, store.port)).set(joining_key(rank), "1")
    monkeypatch.setattr(ray_executor, "create_store", lambda host, port, size: store)
    monkeypatch.setattr(ray_executor, "build_rank", build_rank)
    return ray_executor.RayTPExecutor(config, spec, None, torch.device("cpu"),  # type: ignore[arg-type]
                                      torch.float32, 64, "float32", [FakeActor(r) for r in range(1, tp)])


def test_a_rank_whose_setup_failed_before_the_join_is_named_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rank 1's setup fails on its node before it joins (its checkpoint is missing there): rank 0 sat in its
    own join until the rendezvous timed out (60-120 s) before it looked at the setups. Now it waits for the
    ranks to come to the join while watching their setups, and never enters the join."""
    fake = FakeRay()
    fake.failures["setup-1"] = task_error("ray::RayRank.setup()", FileNotFoundError("/models/llama/config.json"))
    join = Join()
    with pytest.raises(EngineError) as caught:
        rank0_on(fake, (), join, monkeypatch)
    assert caught.value.message == "TP rank 1 (Ray actor) failed setup: FileNotFoundError: /models/llama/config.json"
    assert caught.value.field == "parallel.tp"
    assert not join.entered, "rank 0 entered its join although rank 1 had failed"
    # for a setup to end while rank 0 waited for the join, for the setups' outcome, for the ranks to leave
    assert fake.calls.count("wait") == 3


def test_a_rank_failing_while_others_join_is_named_as_it_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    """TP 3: rank 1 has come to the join; rank 2's actor dies a few polls later (its node is lost)."""

    class LaterDeath(FakeRay):
        def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None
                 ) -> tuple[list[str], list[str]]:
            self.calls.append("wait")
            if self.calls.count("wait") <= 3:  # the first polls of the join wait: every setup still runs
                return [], list(refs)
            return [r for r in refs if r in self.failures], [r for r in refs if r not in self.failures]

    fake = LaterDeath()
    fake.failures["setup-2"] = node_died()
    join = Join()
    with pytest.raises(EngineError) as caught:
        rank0_on(fake, (1,), join, monkeypatch, tp=3)
    assert caught.value.message == ("TP rank 2 (Ray actor) failed setup: The actor died because its node has "
                                    "died. Node Id: 6f1c"), caught.value.message
    assert not join.entered, "rank 0 entered its join although rank 2's node was lost"


def test_a_rank_that_fails_after_the_join_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every rank came to the join, then rank 1's setup failed (its shard's load): rank 0's own error (a
    collective that timed out) is reported as that rank's failure."""
    fake = FakeRay()
    fake.failures["setup-1"] = task_error("ray::RayRank.setup()", RuntimeError("CUDA error: out of memory"))
    join = Join()
    with pytest.raises(EngineError) as caught:
        rank0_on(fake, (1,), join, monkeypatch)
    assert join.entered
    assert caught.value.message == "TP rank 1 (Ray actor) failed setup: RuntimeError: CUDA error: out of memory"
    assert fake.calls.count("wait") == 2  # for the setups' outcome, then for the ranks to leave


def test_a_rank_that_does_not_answer_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """A connector call that rank 2 never answers (its node is stuck): the error named no rank."""

    class Late(FakeRay):
        def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None
                 ) -> tuple[list[str], list[str]]:
            return [r for r in refs if r != "call-2"], [r for r in refs if r == "call-2"]

        def get(self, refs: Any, timeout: float | None = None) -> Any:
            raise ray.exceptions.GetTimeoutError("Get timed out: some object(s) not ready.")

    executor = ray_executor.RayTPExecutor.__new__(ray_executor.RayTPExecutor)
    executor._ray = Late()
    executor._nodes = ["10.0.0.1", "10.0.0.2", "10.0.0.3"]
    with pytest.raises(EngineError) as caught:
        executor._get(["call-1", "call-2"], 30.0, "GetFinished")  # type: ignore[list-item]
    assert caught.value.message == "TP rank 2 (Ray actor on 10.0.0.3) did not answer GetFinished within 30s"


class Stuck(FakeRay):
    """A cluster whose instances never stop by themselves (a server stuck in its drain)."""

    def __init__(self) -> None:
        super().__init__()
        self.util = types.SimpleNamespace(remove_placement_group=lambda pg: self.calls.append("remove group"))

    def wait(self, refs: list[str], num_returns: int = 1, timeout: float | None = None) -> tuple[list[str], list[str]]:
        self.calls.append(f"wait {timeout}")
        return [], list(refs)


class Leader:
    """Rank 0's actor handle: `stop` as the launcher calls it."""

    def __init__(self, calls: list[str]) -> None:
        self.stop = types.SimpleNamespace(options=lambda **kw: types.SimpleNamespace(
            remote=lambda: calls.append("stop")))


def test_a_second_signal_kills_the_instances_without_waiting_for_them(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Before, one ray.wait of STOP_TIMEOUT_S (30 s) for the instances, which a second Ctrl-C did not cut."""
    fake = Stuck()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    for run in deployment.runs:
        run.actors = [Leader(fake.calls)]
        run.serve_ref = f"serve-{run.name}"
        run.pg = object()

    deployment.stop(drain=True, hurry=lambda: fake.calls.count(f"wait {HURRY_POLL_S}") == 3)
    assert fake.calls == ["stop", "stop", *[f"wait {HURRY_POLL_S}"] * 3, "kill", "remove group", "kill",
                          "remove group"], fake.calls


def test_a_ready_instance_whose_actor_died_is_down_and_due_for_a_restart(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Under --backend ray the launcher's view of an instance on another node follows its rank-0 actor: once
    the actor's node dies, the instance is no longer ready (node 0 of a multi-node serve followed /health)."""
    fake = FakeRay()
    deployment = deployment_on(fake, tmp_path, monkeypatch)
    run = deployment.runs[1]
    run.state, run.serve_ref = "ready", "serve"  # type: ignore[assignment]
    fake.failures["serve"] = node_died()
    deployment.tick()
    assert [run.state, run.serve_ref] == ["down", None] and run.record.due is not None
    assert run.record.last_exit == "lost its Ray actor (The actor died because its node has died. Node Id: 6f1c)"
