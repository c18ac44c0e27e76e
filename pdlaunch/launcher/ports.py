"""Ports for the processes of a deployment: configured ones are bind-tested, the rest picked free.

The launcher binds a port only to test it, closes it and hands the number to the child, which binds
it for real a moment later. A port handed out once is never handed out again by the same allocator.
"""

from __future__ import annotations

import errno
import random
import socket

from pdlaunch.errors import PdlaunchError

# Free consecutive ranges are searched here: above the usual service ports, below the Linux
# ephemeral range (32768+), so an outgoing connection cannot take one between test and bind.
_RANGE_LOW, _RANGE_HIGH = 20000, 32000


def _unusable_host(host: str, reason: str) -> PdlaunchError:
    return PdlaunchError(f"cannot bind {host}: {reason}", field="host",
                         hint="set proxy.host / kv_transfer.side_channel_host to 127.0.0.1, 0.0.0.0 or an "
                              "address of this machine; `pdlaunch check-config` names the key")


def port_is_free(host: str, port: int) -> bool:
    """True when a server could bind host:port now (SO_REUSEADDR, as uvicorn binds), False when the
    port is taken. A host that does not resolve or is not this machine's raises PdlaunchError
    instead: "port in use" would send the user after the wrong problem."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except socket.gaierror as exc:
            raise _unusable_host(host, f"the name does not resolve ({exc.strerror or exc})") from None
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise _unusable_host(host, "it is not an address of this machine") from None
            if exc.errno == errno.EADDRINUSE:
                return False
            if exc.errno == errno.EACCES:
                raise PdlaunchError(f"port {port} on {host} needs privileges (ports below 1024 are root's)",
                                    field="port", hint="choose a port above 1024") from None
            raise _unusable_host(host, exc.strerror or str(exc)) from None
    return True


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
