"""`--backend ray`: serve the deployment on a Ray cluster, supervised through Ray.

This process (the launcher) connects to the cluster at launcher.ray_address and, per instance, makes
one placement group with one bundle per TP rank (config/ray_cluster.py: one GPU each on CUDA, one CPU
otherwise, plus the role's launcher.ray_resources; PACK when one node holds them all, SPREAD
otherwise). Once Ray has placed it, rank 0 is a `RayInstance` actor in bundle 0 (ray_instance.py: the
instance's HTTP server and engine) and ranks 1..T-1 are `RayRank` actors in the other bundles
(distributed/ray_rank.py), driven by rank 0 through Ray calls. The HTTP server, the rendezvous store
and every rank's NIXL side channel bind and advertise the address of the node Ray placed them on.
The proxy runs here, as a child process, and knows each instance at its node's address.

Files: ray_deployment.py (`RayDeployment`: start, supervise, stop), ray_actors.py (each instance's
placement group and actors), ray_proxy.py (the proxy here), ray_run.py (one instance as the launcher
sees it), ray_head.py (the head's GCS watched), config/ray_gcs.py (the GCS checked before ray.init),
ray_instance.py (the rank-0 actor), ray_connect_stop.py (how this process leaves Ray: a stop during a Ray call,
and at the command's end).

Supervision (launcher/restart_policy.py, as the local supervisor): an instance whose rank-0 `serve`
call ends (the engine failed, an actor died, its node is gone) has its actors and placement group
removed and, after the backoff, is placed again where Ray finds room, with a new engine_id
(planned id + "-r<restart>"); if its address changed, the proxy is restarted with the new one. An actor (or the proxy)
that a kill from outside ended, while it was built or while it served, is said so as the local launcher says it: the
OOM killer on its node, or Ray's memory monitor where Ray reports that (ray_killed.py; a rank 1..T-1 actor's death,
after which rank 0 exits with code 1, is read from that actor: ray_actors.py), in that line alone (Ray's own paragraph
for a dead worker is not printed beside it). A rank-0 actor Ray reports temporarily unavailable (the launcher lost
touch with it) is not dead yet: the instance is kept and asked again each round, and ended as a dead one only once Ray
reports it dead, its node's raylet refuses a TCP connection (the node is gone, its host up), or it has not answered
for ray_unreachable.UNREACHABLE_GRACE_S. An instance
whose actor is alive but whose /health stops answering is said to be stalled, and is ended and restarted the same
way once stalled for supervision.stall_restart_seconds, when set (ray_stall.py); so is the proxy, killed then and
restarted after the backoff, as the local supervisor does. A
placement group Ray cannot place within launcher.ray_placement_timeout_seconds stops the deployment
(exit 1) naming the resources it asked for; an instance (or the proxy) that fails for good stops it with its
error and the last lines of its log (read through log_dir's shared storage). The connect (ray.init) first checks,
within a bounded wait, that what listens at launcher.ray_address answers as a GCS (config/ray_gcs.py); Ctrl-C/SIGTERM
while connecting or listing the nodes ends the launcher at once, exit 0, after one line (those Ray calls run in a
helper thread, so the signal never raises inside them: config/ray_thread.py; a call it cut short is not torn down:
Ray's shutdown under a running call can crash; the cluster sees the driver gone). A built-in or GGUF model is fetched
or converted here before any placement group is asked for; Ctrl-C/SIGTERM meanwhile ends that work (exit 0).
Ctrl-C/SIGTERM while serving: the proxy drains, every instance stops,
then every actor is killed and every placement group removed. A second Ctrl-C/SIGTERM cuts each of
those waits short: the proxy is killed, and so are the instances' actors, without waiting for their
servers to stop. The actors and placement groups are not detached: a launcher that is killed outright
(SIGKILL) takes them with it, as Ray ends what a dead driver owned.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from rich.console import Console
from rich.markup import escape

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.config.flag_terms import flag_names_from_env, name_error
from pdlaunch.config.ray_init import cluster_words
from pdlaunch.config.ray_thread import cut_short
from pdlaunch.launcher.backends.ray_connect_stop import leave_stopped_ray
from pdlaunch.launcher.backends.ray_deployment import RayDeployment
from pdlaunch.launcher.backends.ray_run import RayDeploymentFailed
from pdlaunch.launcher.log_tail import LogUnreadable, log_tail
from pdlaunch.launcher.output import LossyOutput
from pdlaunch.launcher.readiness import POLL_S
from pdlaunch.launcher.serve import LOG_TAIL_LINES, StopRequested, StopSignals
from pdlaunch.model.demo import resolve_model_path


def run_ray(cfg: DeploymentConfig) -> int:
    """`pdlaunch serve --backend ray`: 0 after a clean stop, 1 when the deployment could not keep serving."""
    # LossyOutput: a status line that cannot be written (a full disk, a closed pipe) is lost, not the deployment
    console = Console(file=LossyOutput(sys.stdout).as_text_io())
    with StopSignals() as connecting:
        deployment = _connected(console, cfg, connecting)
        return _serve(console, cfg, deployment)


def _connected(console: Console, cfg: DeploymentConfig, signals: StopSignals) -> RayDeployment:
    """The deployment, connected to the cluster (ray.init; the GCS checked first within a bounded wait) and its nodes
    listed. A stop signal meanwhile ends this process, exit 0 (ray_connect_stop.py: a cut-short Ray call is not torn
    down)."""
    try:
        with signals.raising():
            return RayDeployment(cfg, console)  # connects (config/ray_cluster.connect: the GCS checked first)
    except StopRequested:
        doing = cut_short() or f"connecting to {cluster_words(cfg.launcher.ray_address)}"
        # in the terms the user typed (`--ray-address auto`), as `pdlaunch serve` hands them to what it runs
        leave_stopped_ray(console, signals.signal_name, doing, 0, flag_names_from_env(os.environ))


def _serve(console: Console, cfg: DeploymentConfig, deployment: RayDeployment) -> int:
    with StopSignals() as signals:
        signals.on_second = lambda: console.print("second signal: stopping now", highlight=False)

        def hurry() -> bool:
            return signals.forced

        try:
            if not _model_prepared(console, deployment.cfg, signals):
                console.print(f"{signals.signal_name} received while fetching or converting the model; stopping "
                              "(nothing was placed on the cluster)", highlight=False)
                deployment.stop(drain=False, hurry=hurry)
                return 0
            if not deployment.start(should_stop=signals.requested.is_set):
                console.print(f"{signals.signal_name or 'stop'} received while starting; stopping")
                deployment.stop(drain=False, hurry=hurry)
                console.print("stopped: every actor and placement group removed", highlight=False)
                return 0
            console.print(f"[green]ready[/green]: OpenAI API at [bold]{deployment.proxy_url}/v1[/bold] "
                          f"(model {cfg.model.path!r}; {len(deployment.runs)} instance(s) on the Ray cluster; logs "
                          f"in {deployment.log_dir}); Ctrl-C to stop", soft_wrap=True)
            while not signals.requested.wait(POLL_S):
                deployment.tick()
            console.print(f"{signals.signal_name} received: draining in-flight requests (up to "
                          f"{cfg.supervision.drain_timeout_seconds:g}s), then removing every actor and placement "
                          "group; Ctrl-C again to stop at once", highlight=False, soft_wrap=True)
            deployment.stop(drain=not signals.forced, hurry=hurry)
            console.print("stopped: every actor and placement group removed", highlight=False)
            return 0
        except RayDeploymentFailed as exc:
            name_error(exc, deployment.flags)  # `--ray-address: the Ray cluster's head is gone`, when the flag set it
            console.print(f"[red]error:[/red] {escape(exc.render())}; stopping the deployment", highlight=False,
                          soft_wrap=True)
            if exc.log_path is not None:
                show_log_tail(console, exc.log_path)
            deployment.stop(drain=False, hurry=hurry)
            return 1
        except deployment.ray.exceptions.RayError as exc:  # the cluster itself failed us (GCS gone, ...)
            console.print(f"[red]error:[/red] the Ray cluster failed: {escape(str(exc))}; stopping the deployment",
                          highlight=False, soft_wrap=True)
            deployment.stop(drain=False, hurry=hurry)
            return 1
        finally:
            deployment.stop(drain=False, hurry=hurry)
            deployment.ray.shutdown()


def _model_prepared(console: Console, cfg: DeploymentConfig, signals: StopSignals) -> bool:
    """Fetch or convert a built-in or GGUF model (the first use of `demo`, or of a GGUF file: minutes) before any
    placement group is asked for, where a stop signal ends it, as `pdlaunch serve` does locally; False when one
    did. The ranks on the nodes find it in the cache (shared storage, as log_dir)."""
    try:
        with signals.raising():
            resolve_model_path(cfg.model.path, say=lambda text: console.print(f"[dim]{text}[/dim]"))
    except StopRequested:
        return False
    return True


def show_log_tail(console: Console, log_path: Path) -> None:
    """The last LOG_TAIL_LINES lines of a failed instance's (or the proxy's) log, as the local backend shows a
    failed child's: an instance's reason (its engine's error) is in its log, on the node Ray placed it on, which
    log_dir's shared storage makes readable here. Nothing when it is not (log_dir local to that node); a line naming
    it when it was not read within TAIL_TIMEOUT_S (that storage hangs)."""
    try:
        lines = log_tail(log_path, LOG_TAIL_LINES)  # bounded: shared storage that hangs (NFS) does not hold the stop
    except LogUnreadable as exc:
        console.print(str(exc), highlight=False, markup=False, soft_wrap=True)
        return
    if lines:
        console.print(f"last {len(lines)} lines of {log_path}:", highlight=False, markup=False, soft_wrap=True)
        for line in lines:
            console.print(f"  {line}", highlight=False, markup=False, soft_wrap=True)
