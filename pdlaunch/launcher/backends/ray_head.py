"""`--backend ray`: notice that the cluster's head (its GCS) is gone before Ray ends the launcher for it.

When the GCS stops answering, Ray's core worker in the launcher retries for
gcs_rpc_server_reconnect_timeout_s (60 s by default) and then ends the process with a fatal log line of
its own: no pdlaunch error, and calls such as removing a placement group block until then. So the
launcher probes the GCS port itself (a TCP connect, no Ray call) every PROBE_S; once it has refused
connections for LOST_S in a row the deployment stops with an error naming the address, and skips the
Ray calls that would block (the raylets end the actors themselves when their GCS is gone).

The actors may die with the head (a head that is the only node, or whose raylet held them) and be seen dead before
LOST_S: an actor's end is acted on (its actors killed, its placement group removed: Ray calls that ask the GCS)
only once `answers_now` found the GCS accepting connections; until then the instance is left as it is, and the
head's loss ends the deployment after LOST_S (ray_deployment.py).
"""

from __future__ import annotations

import socket
from types import ModuleType

from pdlaunch.config.ray_cluster import check_address
from pdlaunch.errors import PdlaunchError

PROBE_S = 2.0
LOST_S = 15.0  # well inside Ray's own 60 s, long enough for a GCS restarted with fault tolerance
CONNECT_TIMEOUT_S = 2.0


class HeadWatch:
    """Whether the GCS at `gcs_address` (HOST:PORT, as Ray reports it) still accepts connections."""

    def __init__(self, gcs_address: str | None) -> None:
        self.address = gcs_address
        self.lost = False
        self._where: tuple[str, int] | None = None
        if gcs_address:
            try:
                self._where = check_address(gcs_address)
            except PdlaunchError:
                self._where = None  # not a HOST:PORT we can probe: leave it to Ray
        self._next_probe = 0.0
        self._down_since: float | None = None
        self._why = ""

    @classmethod
    def of(cls, ray: ModuleType) -> HeadWatch:
        """The watch of the cluster `ray` is connected to."""
        context = getattr(ray, "get_runtime_context", None)
        return cls(str(context().gcs_address) if context is not None else None)

    def check(self, now: float) -> str | None:
        """Probe when due (`now`: time.monotonic()); what went wrong once the GCS refused for LOST_S, else None."""
        if self._where is None or self.lost:
            return None
        if now >= self._next_probe:
            self._probe(now)
        if self._down_since is None or now - self._down_since < LOST_S:
            return None
        self.lost = True
        return (f"the Ray cluster's head is gone: its GCS at {self.address} has not accepted a connection "
                f"for {now - self._down_since:.0f}s ({self._why})")

    def answers_now(self, now: float) -> bool:
        """Whether the GCS accepts a connection now, probed at once (a refusal seen within PROBE_S stands): False
        when it refuses (or was found gone), and then every Ray call that asks it (killing an actor, removing a
        placement group) would block until Ray ends this process. A refusal counts towards LOST_S as check's do.
        True where there is nothing to probe (left to Ray)."""
        if self.lost:
            return False
        if self._where is None:
            return True
        if self._down_since is None or now >= self._next_probe:
            self._probe(now)
        return self._down_since is None

    def _probe(self, now: float) -> None:
        assert self._where is not None
        self._next_probe = now + PROBE_S
        try:
            socket.create_connection(self._where, timeout=CONNECT_TIMEOUT_S).close()
        except OSError as exc:
            if self._down_since is None:
                self._down_since, self._why = now, str(exc) or type(exc).__name__
            return
        self._down_since = None
