"""Ports for the processes of a deployment: configured ones are bind-tested, the rest picked free.

The launcher binds a port only to test it, closes it and hands the number to the child, which binds
it for real a moment later (after loading its model: seconds). A port handed out once is never handed out again
by the same allocator, and, given the deployment's PortReservations, by no other pdlaunch launcher on this host
while the deployment runs (config/port_reservations.py): two deployments started at once no longer both take it.
A free pick goes around the ports other launchers hold, also where the allocator holds nothing itself.
"""

from __future__ import annotations

import random

from pdlaunch.config.addresses import port_is_free
from pdlaunch.config.port_reservations import PortReservations, reservation_holder
from pdlaunch.errors import PdlaunchError

# Free consecutive ranges are searched here: above the usual service ports, below the Linux
# ephemeral range (32768+), so an outgoing connection cannot take one between test and bind.
_RANGE_LOW, _RANGE_HIGH = 20000, 32000


class PortAllocator:
    """Hands out ports on one host without handing any out twice."""

    def __init__(self, host: str, reservations: PortReservations | None = None, taken: set[int] | None = None) -> None:
        """`taken`: the port numbers handed out already, shared by the allocators of one node's plan (another host
        of the node may overlap this one: a wildcard takes the port on every address)."""
        self.host = host
        self.taken: set[int] = set() if taken is None else taken
        self.reservations = reservations  # None: a plan only looked at (tests), nothing held for a run

    def claim(self, port: int, field: str, what: str, fix: str = "give this deployment other ports") -> int:
        """A configured port: it must be free now and held by no other launcher. `field` is the config path
        that set it; `fix` says how to give this deployment another (where another launcher holds it)."""
        in_use = PdlaunchError(f"port {port} ({what}) on {self.host} is already in use", field=field,
                               hint="stop what uses it or choose another port")
        if port in self.taken:  # by another process of this deployment
            raise in_use
        holder = self._reserve(port)
        if holder is not None:
            raise PdlaunchError(f"port {port} ({what}) on {self.host} belongs to another pdlaunch deployment on this "
                                f"host, starting or running ({holder})", field=field,
                                hint=f"{fix}, or stop that one first")
        try:
            free = port_is_free(self.host, port)
        except PdlaunchError as exc:
            self._unreserve([port])
            if exc.field == "port":
                raise PdlaunchError(exc.message, field=field, hint=exc.hint) from None
            raise
        if not free:
            self._unreserve([port])
            raise in_use
        self.taken.add(port)
        return port

    def free(self, what: str) -> int:
        """A free port below the ephemeral range (as free_range's): the kernel's own pick (bind to port 0)
        comes from the ephemeral range, where another process's outgoing connection can take it between
        this test and the child's bind (seen in CI: a proxy port taken while the instances loaded)."""
        return self.free_range(1, what)

    def free_range(self, count: int, what: str) -> int:
        """First of `count` consecutive free ports."""
        rng = random.Random()
        for _ in range(200):
            base = rng.randrange(_RANGE_LOW, _RANGE_HIGH - count)
            ports = range(base, base + count)
            if self.taken.intersection(ports):
                continue
            held = []  # held first, tested after: a launcher that tests a port we hold does not get it
            for p in ports:
                if self._reserve(p) is not None or self._held_elsewhere(p):
                    break
                held.append(p)
            free = False
            try:
                free = len(held) == count and all(port_is_free(self.host, p) for p in ports)
            finally:
                if not free:
                    self._unreserve(held)
            if free:
                self.taken.update(ports)
                return base
        raise PdlaunchError(f"found no {count} consecutive free port(s) for {what} on {self.host}",
                            hint="set kv_transfer.side_channel_port to a free range")

    def _reserve(self, port: int) -> str | None:
        return None if self.reservations is None else self.reservations.reserve(self.host, port)

    def _held_elsewhere(self, port: int) -> bool:
        """An allocator that holds nothing (`bench compare` and `smoke` pick a proxy port the deployment claims
        later) still leaves out a port another launcher holds: that claim would refuse it."""
        return self.reservations is None and reservation_holder(self.host, port) is not None

    def _unreserve(self, ports: list[int]) -> None:
        if self.reservations is not None:
            for port in ports:
                self.reservations.release_port(self.host, port)
