"""Ports a launcher has handed out, held against every other pdlaunch launcher on this host while its deployment runs.

A launcher bind-tests a port, closes it and hands the number to a child that binds it only after loading its model,
seconds later (launcher/ports.py). Two deployments started in the same second from one config both found its fixed
ports free, and each then lost some of its children's binds to the other: both stopped, one on an instance's
"address already in use" that named no setting. Now every port a launcher hands out is also held, from its plan
until its deployment stops, as a name in the host's abstract unix socket namespace (`\\0pdlaunch-port:HOST:PORT`):

- the kernel gives a name to one socket at a time, so of two launchers claiming one port at once exactly one
  gets it; the other picks another free port, or refuses a configured one naming its field;
- the kernel takes the name back when its holder exits, however it exits: a killed launcher leaves nothing stale;
- abstract names are scoped by network namespace, as TCP ports are: containers with their own network do not see
  each other's names, and every process that could take the port does.

The holder listens on its names only so that a refused launcher can learn who holds one (SO_PEERCRED gives the
listener's pid); it never accepts. Linux only: elsewhere nothing is held and the bind test stays the only check.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import struct
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

_NAME_MAX = 100  # an abstract name has at most 107 bytes after its NUL
_BACKLOG = 8  # refused launchers asking who holds a name; never accepted, so a few is plenty
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
SUPPORTED = sys.platform.startswith("linux")


def _name(host: str, port: int) -> bytes:
    key = f"pdlaunch-port:{host.lower()}:{port}"
    if len(key) > _NAME_MAX:  # a long host name: its digest keeps the key unique and short
        key = f"pdlaunch-port:{hashlib.sha256(host.lower().encode()).hexdigest()[:32]}:{port}"
    return b"\0" + key.encode()


def _command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "its command line is not readable"
    return " ".join(arg.decode(errors="replace") for arg in argv if arg)[:300] or "no command line"


def reservation_holder(host: str, port: int) -> str | None:
    """Who holds host:port for a deployment on this host ("pid N: command"), or None when no launcher does."""
    if not SUPPORTED:
        return None
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(_name(host, port))
        except (ConnectionRefusedError, FileNotFoundError):
            return None  # no such name: nobody holds the port
        except OSError:  # EAGAIN: the holder's backlog is full of earlier askers
            return "another pdlaunch launcher on this host (it did not say which)"
        pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    if pid == 0:  # the kernel's answer for a process this PID namespace cannot see (another container)
        return "a pdlaunch launcher in another container sharing this host's network"
    return f"pid {pid}: {_command_of(pid)}"


class PortReservations:
    """The names this launcher holds; `release` (or the process's exit) gives them back."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], socket.socket] = {}
        self._warned = False

    def reserve(self, host: str, port: int) -> str | None:
        """Hold host:port. None when it is held now (by us, or nothing can be held here); else who holds it."""
        if not SUPPORTED or (host, port) in self._held:
            return None
        for _ in range(2):  # once more when the holder let go between our bind and our question
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(_name(host, port))
                sock.listen(_BACKLOG)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    self._cannot_hold(exc)
                    return None
                holder = reservation_holder(host, port)
                if holder is not None:
                    return holder
                continue
            self._held[(host, port)] = sock
            return None
        return "another pdlaunch launcher on this host (it let go and took it again)"

    def _cannot_hold(self, exc: OSError) -> None:
        """A sandbox without unix sockets: the bind test alone guards the ports, as before; said once."""
        if not self._warned:
            self._warned = True
            logger.warning("cannot hold ports against other pdlaunch launchers on this host (%s); two deployments "
                           "started at once may pick the same port", exc.strerror or exc)

    def release_port(self, host: str, port: int) -> None:
        sock = self._held.pop((host, port), None)
        if sock is not None:
            sock.close()

    def release(self) -> None:
        """Give every name back: the deployment has stopped (its children's ports are closed)."""
        for sock in self._held.values():
            sock.close()
        self._held.clear()

    @property
    def held(self) -> list[tuple[str, int]]:
        return sorted(self._held)

    def __del__(self) -> None:  # a plan dropped without a stop (a failed start): no ResourceWarning, names freed
        self.release()
