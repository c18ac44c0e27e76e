"""Free TCP ports for the deployments the tests start, picked as the launcher picks its own.

A port the kernel hands out for a bind to port 0 is free again once the socket closes, so two such picks in a
row can return the same port (a proxy and a decode both on 38131 failed a CI run), and it lies in the ephemeral
range, where an outgoing connection (Ray opens many) can take it before the test's server binds it. These picks
come from one PortAllocator: distinct, below the ephemeral range, and none held by a pdlaunch launcher running
meanwhile (another test's deployment).
"""

from __future__ import annotations

from pdlaunch.config.port_reservations import PortReservations
from pdlaunch.launcher.ports import PortAllocator


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct ports on `host`, each free when picked."""
    reservations = PortReservations()  # skips ports a running launcher holds; released once picked
    try:
        allocator = PortAllocator(host, reservations)
        return [allocator.free("a test's server") for _ in range(count)]
    finally:
        reservations.release()


def free_port(host: str = "127.0.0.1") -> int:
    """One port on `host`, free when picked."""
    return free_ports(1, host)[0]
