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

A port is held per address, as TCP binds it: two nodes of a multi-node test on one machine (127.0.0.1, 127.0.0.2)
hold the same numbers. A wildcard address (0.0.0.0, ::) takes the port on every address, so its name and the
port's names on other addresses exclude each other: a launcher holds its name, then looks for the other kind
(the wildcards' names, or every name of the port that /proc/net/unix lists) and lets go when one is held. Of two
launchers doing so at once, the later to look sees the other: never both keep the port. An IP address is named in
its one canonical spelling (ipaddress's: `::0` and `0:0:0:0:0:0:0:0` are `::`, `0:0::1` is `::1`; `::ffff:127.0.0.1`
is `127.0.0.1`), so every spelling of one address shares its name, and every spelling of a wildcard is one.

The holder listens on its names only so that a refused launcher can learn who holds one (SO_PEERCRED gives the
listener's pid); it never accepts. Linux only: elsewhere nothing is held and the bind test stays the only check.
"""

from __future__ import annotations

import errno
import hashlib
import ipaddress
import logging
import socket
import struct
import sys
from pathlib import Path

from pdlaunch.config.addresses import is_wildcard, unmapped

logger = logging.getLogger(__name__)

_NAME_MAX = 100  # an abstract name has at most 107 bytes after its NUL
_BACKLOG = 8  # refused launchers asking who holds a name; never accepted, so a few is plenty
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PREFIX = "pdlaunch-port:"
WILDCARD_HOSTS = ("0.0.0.0", "::")  # a server bound there holds the port on every address of the host
SUPPORTED = sys.platform.startswith("linux")


def _canonical(host: str) -> str:
    """`host` as its reservation is named: an IP address in ipaddress's spelling (`0:0:0:0:0:0:0:1` is `::1`; an
    IPv4-mapped one, `::ffff:127.0.0.1`, is its IPv4 address, as a bind takes it), a host name in lower case (DNS
    names are case-insensitive)."""
    try:
        return str(unmapped(ipaddress.ip_address(host)))
    except ValueError:
        return host.lower()


def _name(host: str, port: int) -> bytes:
    host = _canonical(host)
    key = f"{_PREFIX}{host}:{port}"
    if len(key) > _NAME_MAX:  # a long host name: its digest keeps the key unique and short
        key = f"{_PREFIX}{hashlib.sha256(host.encode()).hexdigest()[:32]}:{port}"
    return b"\0" + key.encode()


def _names_of_port(port: int) -> set[bytes]:
    """Every reservation name of `port` bound in this network namespace, whatever its address: /proc/net/unix
    lists the abstract names bound there ('@' for the leading NUL), the same scope as the names."""
    try:
        lines = Path("/proc/net/unix").read_bytes().splitlines()[1:]
    except OSError:
        return set()
    prefix, suffix = f"@{_PREFIX}".encode(), f":{port}".encode()
    paths = (fields[7] for fields in (line.split(None, 7) for line in lines) if len(fields) == 8)
    return {b"\0" + path[1:] for path in paths if path.startswith(prefix) and path.endswith(suffix)}


def _overlapping(host: str, port: int) -> list[bytes]:
    """The names of `port` on the addresses whose servers `host`'s would collide with: every other address for a
    wildcard (IPv4 and IPv6 alike: an address of the other family is refused too, rarely needed), else the
    wildcards."""
    if is_wildcard(host):
        return sorted(_names_of_port(port) - {_name(host, port)})
    return [_name(wildcard, port) for wildcard in WILDCARD_HOSTS]


def _command_of(pid: int) -> str:
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return "its command line is not readable"
    return " ".join(arg.decode(errors="replace") for arg in argv if arg)[:300] or "no command line"


def reservation_holder(host: str, port: int) -> str | None:
    """Who holds host:port for a deployment on this host ("pid N: command"), on that address or on one overlapping
    it (module doc), or None when no launcher does."""
    if not SUPPORTED:
        return None
    for name in [_name(host, port), *_overlapping(host, port)]:
        holder = _holder(name)
        if holder is not None:
            return holder
    return None


def _holder(name: bytes) -> str | None:
    """Who listens on reservation name `name`, or None when nobody does."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        try:
            probe.connect(name)
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
        host = _canonical(host)  # held under its name's spelling: another spelling of it is the same port
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
            holder = self._overlap_holder(host, port)
            if holder is not None:  # looked for after holding ours: of two launchers at once, one sees the other
                sock.close()
                return holder
            self._held[(host, port)] = sock
            return None
        return "another pdlaunch launcher on this host (it let go and took it again)"

    def _overlap_holder(self, host: str, port: int) -> str | None:
        """Who holds `port` on an address overlapping `host`, other than this deployment: one of its own processes
        on such an address collides in its TCP bind, as it did before ports were held."""
        ours = {_name(h, p) for h, p in self._held}
        for name in _overlapping(host, port):
            holder = None if name in ours else _holder(name)
            if holder is not None:
                return holder
        return None

    def _cannot_hold(self, exc: OSError) -> None:
        """A sandbox without unix sockets: the bind test alone guards the ports, as before; said once."""
        if not self._warned:
            self._warned = True
            logger.warning("cannot hold ports against other pdlaunch launchers on this host (%s); two deployments "
                           "started at once may pick the same port", exc.strerror or exc)

    def release_port(self, host: str, port: int) -> None:
        sock = self._held.pop((_canonical(host), port), None)
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
