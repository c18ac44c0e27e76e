"""`--backend ray`: the ports the launcher hands out are held against every other pdlaunch launcher on this host
(config/port_reservations.py) from its plan until the deployment stops, as the local backend holds them
(launcher/deployment.py): a second deployment started meanwhile, Ray or local, is refused a configured one and picks
around the free ones. Before, the Ray launcher planned without holding anything, so two deployments started at once
could both pick one proxy, instance or side-channel port. Every way the run ends gives them back: a clean stop, a
failed start, a stop signal while starting, a failure before the first placement. Stand-ins for the ray module and
the actors; no cluster."""

from __future__ import annotations

import io
import os
import signal
from pathlib import Path

import httpx
import pytest
from rich.console import Console

pytest.importorskip("ray", reason="--backend ray needs the ray package (pip install 'pdlaunch[ray]')")

from pdlaunch.config.deployment_config import DeploymentConfig  # noqa: E402 (after the importorskip)
from pdlaunch.config.port_reservations import PortReservations, reservation_holder  # noqa: E402
from pdlaunch.errors import PdlaunchError  # noqa: E402
from pdlaunch.launcher.backends import ray as backend  # noqa: E402
from pdlaunch.launcher.backends import ray_deployment  # noqa: E402
from pdlaunch.launcher.backends.ray_deployment import RayDeployment  # noqa: E402
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed, RayRun  # noqa: E402
from pdlaunch.launcher.plan import DeploymentPlan, plan_deployment  # noqa: E402
from tests.cluster.test_backend_failures_ray import NODES, FakeRay, deployment_on, ray_cfg  # noqa: E402
from tests.cluster.test_ray_failure_log import Actors  # noqa: E402


def planned_ports(deployment: RayDeployment) -> list[tuple[str, int]]:
    """Every port the deployment's plan handed out: the proxy's, and each instance's HTTP, rendezvous and every
    rank's side channel (rank r binds the instance's side_channel_port + r)."""
    plan = deployment.plan
    assert plan.proxy_port is not None
    ports = [(plan.proxy_host, plan.proxy_port)]
    for instance in plan.instances:
        spec = instance.spec
        ports.append((spec.host, spec.port))
        if spec.master_port is not None:
            ports.append((spec.host, spec.master_port))
        if spec.side_channel_port is not None:
            ports += [(spec.host, spec.side_channel_port + rank) for rank in range(spec.tp)]
    return ports


def holders(ports: list[tuple[str, int]]) -> dict[tuple[str, int], str | None]:
    return {port: reservation_holder(*port) for port in ports}


def assert_held_here(ports: list[tuple[str, int]]) -> None:
    mine = f"pid {os.getpid()}: "
    unheld = {port: holder for port, holder in holders(ports).items() if holder is None or not holder.startswith(mine)}
    assert not unheld, f"ports of the running Ray deployment not held by its launcher: {unheld}"


def assert_released(ports: list[tuple[str, int]]) -> None:
    held = {port: holder for port, holder in holders(ports).items() if holder is not None}
    assert not held, f"ports still held after the Ray deployment ended: {held}"


def test_a_running_ray_deployment_holds_its_ports_until_it_stops(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ray_cfg(tmp_path).model_copy(deep=True)
    cfg.instances[1].tp = 2  # a rendezvous port and two side-channel ports
    monkeypatch.setattr(ray_deployment, "connect", lambda cfg: FakeRay())
    monkeypatch.setattr(ray_deployment, "live_nodes", lambda ray_module: NODES)
    deployment = RayDeployment(cfg, Console(file=io.StringIO()))
    ports = planned_ports(deployment)
    assert len(ports) == 7, ports
    assert_held_here(ports)

    # another launcher on this host configured with the running deployment's proxy port is refused, naming it
    proxy_host, proxy_port = ports[0]
    other = DeploymentConfig.model_validate({"device": "cpu", "proxy": {"host": proxy_host, "port": proxy_port},
                                             "instances": [{"role": "colocated"}]})
    theirs = PortReservations()
    with pytest.raises(PdlaunchError, match="belongs to another pdlaunch deployment") as refused:
        plan_deployment(other, theirs)
    assert refused.value.field == "proxy.port" and f"pid {os.getpid()}" in refused.value.message
    theirs.release()

    deployment.stop(drain=False)
    assert_released(ports)


@pytest.mark.parametrize("ending", ["failed start", "stop signal while starting", "stop signal while serving"])
def test_every_end_of_the_run_gives_the_ports_back(ending: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   term_guard: None) -> None:
    deployment = deployment_on(FakeRay(), tmp_path, monkeypatch)
    ports = planned_ports(deployment)
    monkeypatch.setattr(ray_deployment, "POLL_S", 0.01)
    monkeypatch.setattr(backend, "POLL_S", 0.01)
    monkeypatch.setattr(backend, "RayDeployment", lambda cfg, console: deployment)
    monkeypatch.setattr(backend, "resolve_model_path", lambda path, say: Path(path))
    monkeypatch.setattr(deployment, "answers", lambda run: False)
    held_meanwhile: list[bool] = []

    def place(run: RayRun) -> None:  # the placement asked of the cluster: the ports are held meanwhile
        assert_held_here(ports)
        held_meanwhile.append(True)
        run.state = "placing"
        if ending == "stop signal while starting":
            os.kill(os.getpid(), signal.SIGTERM)

    if ending == "failed start":  # prefill-0's rank 0 exits with code 1 while starting
        deployment.actors = Actors()  # type: ignore[assignment]
        monkeypatch.setattr(deployment.actors, "place", place)
        expected = 1
    elif ending == "stop signal while starting":
        monkeypatch.setattr(deployment.actors, "place", place)
        monkeypatch.setattr(deployment.actors, "placed", lambda run: False)
        expected = 0
    else:
        def started(should_stop: object) -> bool:
            for run in deployment.runs:
                place(run)
                run.state = "ready"
            return True

        monkeypatch.setattr(deployment, "start", started)
        monkeypatch.setattr(deployment, "tick", lambda: os.kill(os.getpid(), signal.SIGTERM))
        expected = 0
    assert backend.run_ray(ray_cfg(tmp_path)) == expected
    assert held_meanwhile, "the run never reached its placement"
    assert_released(ports)


def test_a_failure_before_the_first_placement_gives_the_ports_back(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The cluster fails the launcher while it lists the nodes, after the plan: the ports it held are given back
    at once (the error's traceback keeps the half-made deployment alive, so its garbage collection would not)."""
    ray = pytest.importorskip("ray")
    plans: list[DeploymentPlan] = []
    real_plan = ray_deployment.plan_deployment

    def plan(cfg: DeploymentConfig, reservations: PortReservations | None = None) -> DeploymentPlan:
        planned = real_plan(cfg, reservations)
        assert reservations is not None, "the Ray launcher planned its ports without holding them"
        plans.append(planned)
        return planned

    def nodes(ray_module: object) -> list[object]:
        raise ray.exceptions.RaySystemError("GCS unavailable")

    monkeypatch.setattr(ray_deployment, "connect", lambda cfg: FakeRay())
    monkeypatch.setattr(ray_deployment, "plan_deployment", plan)
    monkeypatch.setattr(ray_deployment, "live_nodes", nodes)
    with pytest.raises(RayDeploymentFailed, match="GCS unavailable"):
        RayDeployment(ray_cfg(tmp_path), Console(file=io.StringIO()))
    assert len(plans) == 1
    planned = plans[0]
    assert planned.proxy_port is not None
    assert_released([(planned.proxy_host, planned.proxy_port),
                     *((i.spec.host, i.spec.port) for i in planned.instances)])


def test_a_failure_after_the_http_clients_are_made_closes_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure late in RayDeployment.__init__ (here the proxy's supervisor; in a run, a stop signal) closes the
    HTTP clients it had made (its /health checks, the stall watch's probes), as it gives the ports back: stop() never
    runs for it."""
    clients: list[httpx.Client] = []
    real_client = httpx.Client

    def client(**kwargs: object) -> httpx.Client:
        clients.append(real_client(**kwargs))  # type: ignore[arg-type]
        return clients[-1]

    def proxy(*args: object) -> object:
        raise KeyboardInterrupt  # what a stop signal raises in the launcher

    monkeypatch.setattr(ray_deployment, "connect", lambda cfg: FakeRay())
    monkeypatch.setattr(ray_deployment, "live_nodes", lambda ray_module: NODES)
    monkeypatch.setattr(ray_deployment.httpx, "Client", client)
    monkeypatch.setattr(ray_deployment, "RayProxy", proxy)
    with pytest.raises(KeyboardInterrupt):
        RayDeployment(ray_cfg(tmp_path), Console(file=io.StringIO()))
    assert len(clients) == 2 and all(c.is_closed for c in clients), [c.is_closed for c in clients]
