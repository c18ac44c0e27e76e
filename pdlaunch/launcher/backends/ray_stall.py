"""`--backend ray`: instances and the proxy alive but stalled, as the local supervisor sees them (stall_watch.py).

A rank-0 actor whose engine hangs, or whose process is stopped or swapping, keeps its `serve` call running: Ray
reports nothing, and only its /health, which no longer answers within proxy.health_timeout_seconds, shows it. The
launcher probes every ready instance's /health at its node's address once a second, says when one stalls and when
it answers again, and, once one has been stalled for supervision.stall_restart_seconds (when set), has it ended
like a dead one: its actors killed, its placement group removed, its peers asked to forget it, and a restart after
the backoff (ray_deployment.py). The proxy, a process on this machine, is watched the same way while it is ready, as
the local supervisor watches it: killed once stalled that long, and restarted after the backoff (ray_proxy.py).
"""

from __future__ import annotations

from collections.abc import Callable

from pdlaunch.config.deployment_config import DeploymentConfig
from pdlaunch.launcher.backends.ray_run import RayRun
from pdlaunch.launcher.stall_watch import StallWatch


class RayStalls:
    """The stalls of the ready instances and of the proxy; `check(run)` once per supervision round for each ready
    instance, `check_proxy` for the proxy while it is ready."""

    PROXY = "proxy"  # the proxy's name in the watch (an instance's is ROLE-N)

    def __init__(self, cfg: DeploymentConfig, say: Callable[[str], None]) -> None:
        self.timeout_s = cfg.proxy.health_timeout_seconds
        self.restart_s = cfg.supervision.stall_restart_seconds
        self.say = say
        self.watch = StallWatch({}, self.timeout_s)  # name -> /health URL, set as each is checked
        self._started = False
        self._stalled: set[str] = set()  # names said to be stalled

    def check(self, run: RayRun) -> str | None:
        """For a ready instance whose `serve` call still runs: None, or how it ended (for its restart record) when
        it has been stalled for supervision.stall_restart_seconds; the caller then ends it as a dead one."""
        return self._check(run.name, f"{run.url}/health",
                           f"{run.name} is stalled: its Ray actor is alive, but /health at {run.url} has not answered "
                           f"within {self.timeout_s:g}s (hung, stopped or swapping?); the proxy routes around it",
                           f"{run.name} answers /health again at {run.url}; no longer stalled")

    def check_proxy(self, pid: int | None, url: str) -> str | None:
        """For the ready, running proxy (process `pid`, at `url`): as `check`; the caller then kills it, and its
        exit restarts it."""
        return self._check(self.PROXY, f"{url}/health",
                           f"the proxy (pid {pid}) is stalled: alive, but /health at {url} has not answered within "
                           f"{self.timeout_s:g}s (stopped, hung or swapping?); clients wait",
                           f"the proxy (pid {pid}) answers /health again; no longer stalled")

    def _check(self, name: str, url: str, stalled: str, answers: str) -> str | None:
        if self.watch.urls.get(name) != url:  # first seen, or back at another node's address after a restart
            self.forget(name)
            self.watch.urls[name] = url
        self.watch.watch(name, True)
        if not self._started:  # the probe thread starts with the first one checked
            self._started = True
            self.watch.start()
        stalled_for = self.watch.stalled_for(name)
        if stalled_for is None:
            if name in self._stalled:
                self._stalled.discard(name)
                self.say(answers)
            return None
        if name not in self._stalled:
            self._stalled.add(name)
            if self.restart_s is None:
                then = "it is left running (supervision.stall_restart_seconds is unset)"
            else:
                then = f"it is restarted after supervision.stall_restart_seconds: {self.restart_s:g}s"
            self.say(f"{stalled}; {then}")
        if self.restart_s is None or stalled_for < self.restart_s:
            return None
        self.forget(name)
        return (f"was stalled for {stalled_for:.0f}s (no /health answer; supervision.stall_restart_seconds: "
                f"{self.restart_s:g})")

    def forget(self, name: str) -> None:
        """`name` is no longer watched (it ended, or it is checked at a new address): its stall is forgotten."""
        self.watch.watch(name, False)
        self._stalled.discard(name)

    def stop(self) -> None:
        """End the probe thread (within the probe timeout and a second) and close its HTTP client."""
        self.watch.stop()
