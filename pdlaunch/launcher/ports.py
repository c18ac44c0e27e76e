"""Ports for the processes of a deployment: configured ones are bind-tested, the rest picked free.

The launcher binds a port only to test it, closes it and hands the number to the child, which binds
it for real a moment later. A port handed out once is never handed out again by the same allocator.
"""

from __future__ import annotations

import random

from pdlaunch.config.addresses import port_is_free
from pdlaunch.errors import PdlaunchError

# Free consecutive ranges are searched here: above the usual service ports, below the Linux
# ephemeral range (32768+), so an outgoing connection cannot take one between test and bind.
_RANGE_LOW, _RANGE_HIGH = 20000, 32000


class PortAllocator:
    """Hands out ports on one host without handing any out twice."""

    def __init__(self, host: str) -> None:
        self.host = host
        self.taken: set[int] = set()

    def claim(self, port: int, field: str, what: str) -> int:
        """A configured port: it must be free now. `field` is the config path that set it."""
        try:
            free = port not in self.taken and port_is_free(self.host, port)
        except PdlaunchError as exc:
            if exc.field == "port":
                raise PdlaunchError(exc.message, field=field, hint=exc.hint) from None
            raise
        if not free:
            raise PdlaunchError(f"port {port} ({what}) on {self.host} is already in use", field=field,
                                hint="stop what uses it or choose another port")
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
            if not self.taken.intersection(ports) and all(port_is_free(self.host, p) for p in ports):
                self.taken.update(ports)
                return base
        raise PdlaunchError(f"found no {count} consecutive free port(s) for {what} on {self.host}",
                            hint="set kv_transfer.side_channel_port to a free range")
