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
hold the same numbers. A host name is held on every address it resolves to (`localhost`: 127.0.0.1, and ::1 where
/etc/hosts lists both), so it and each of its addresses are one port; a name that does not resolve is held as the
name (its server's bind fails anyway). A wildcard address (0.0.0.0, ::) takes the port on every address, so its
name and the port's names on other addresses exclude each other: a launcher holds its name, then looks for the
other kind (the wildcards' names, or every name of the port that /proc/net/unix lists) and lets go when one is
held. Of two launchers doing so at once, the later to look sees the other: never both keep the port. An IP address
is named in its one canonical spelling (ipaddress's: `::0` and `0:0:0:0:0:0:0:0` are `::`, `0:0::1` is `::1`;
`::ffff:127.0.0.1` is `127.0.0.1`), so every spelling of one address shares its name, and every spelling of a
wildcard is one.

The holder listens on its names only so that a refused launcher can learn who holds one (SO_PEERCRED gives the
listener's pid, set at connect): a thread of the holder's process accepts each asker's connection and closes it at
once. Unaccepted, every question stayed queued on the name, and once its backlog was full (the tenth) a refused
launcher could no longer say who held the port. Linux only: elsewhere nothing is held and the bind test stays the
only check.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import socket
import struct
import sys
import time
from pathlib import Path

from pdlaunch.config.addresses import canonical_address, host_addresses, is_wildcard
from pdlaunch.config.reservation_answers import answerer

logger = logging.getLogger(__name__)

_NAME_MAX = 100  # an abstract name has at most 107 bytes after its NUL
_BACKLOG = 64  # refused launchers asking at once who holds a name, until the answering thread accepts them
_ASK_TIMEOUT_S = 2.0  # a backlog full of askers empties in milliseconds; a holder stopped (SIGSTOP) never empties it
_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PREFIX = "pdlaunch-port:"
WILDCARD_HOSTS = ("0.0.0.0", "::")  # a server bound there holds the port on every address of the host
SUPPORTED = sys.platform.startswith("linux")


def _canonical(host: str) -> str:
    """An address as its reservation is named: an IP address in canonical_address's spelling, else (a host name that
    does not resolve) the name in lower case (DNS names are case-insensitive)."""
    try:
        return canonical_address(host)
    except ValueError:
        return host.lower()


def _addresses(host: str) -> list[str]:
    """The addresses `host` is held on (module doc): an IP address, every address a host name resolves to, or a
    name that does not resolve itself."""
    return list(host_addresses(host)) or [_canonical(host)]


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
    """Who holds host:port for a deployment on this host ("pid N: command", or a phrase saying why its launcher is not
    named: refusals put it in parentheses, so it has none itself), on one of `host`'s addresses or on one overlapping
    it (module doc), or None when no launcher does."""
    if not SUPPORTED:
        return None
    for address in _addresses(host):
        for name in [_name(address, port), *_overlapping(address, port)]:
            holder = _holder(name)
            if holder is not None:
                return holder
    return None


def _holder(name: bytes) -> str | None:
    """Who listens on reservation name `name`, or None when nobody does."""
    deadline = time.monotonic() + _ASK_TIMEOUT_S
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.setblocking(False)
        while True:
            try:
                probe.connect(name)
                break
            except (ConnectionRefusedError, FileNotFoundError):
                return None  # no such name: nobody holds the port
            except BlockingIOError:  # EAGAIN: the holder's backlog is full of askers its thread has yet to accept
                if time.monotonic() > deadline:
                    return f"its launcher did not say which it is within {_ASK_TIMEOUT_S:g}s: is it stopped?"
                time.sleep(0.01)
            except OSError as exc:  # not expected of a unix socket's connect; still no traceback for it
                return f"asking its launcher which it is failed: {exc.strerror or exc}"
        pid = _UCRED.unpack(probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size))[0]
    if pid == 0:  # the kernel's answer for a process this PID namespace cannot see (another container)
        return "its launcher runs in another container sharing this host's network"
    return f"pid {pid}: {_command_of(pid)}"


class PortReservations:
    """The names this launcher holds; `release` (or the process's exit) gives them back."""

    def __init__(self) -> None:
        self._held: dict[tuple[str, int], socket.socket] = {}  # (address, port): its name's listener
        self._warned = False

    def reserve(self, host: str, port: int) -> str | None:
        """Hold host:port on every address of `host` (module doc). None when it is held now (by us, or nothing can
        be held here); else who holds it, and none of its addresses is held."""
        if not SUPPORTED:
            return None
        taken: list[str] = []
        for address in _addresses(host):
            if (address, port) in self._held:
                continue  # ours already: another spelling of the address, or a name that resolves to it
            holder = self._reserve_address(address, port)
            if holder is not None:
                for held in taken:
                    self._let_go(held, port)
                return holder
            taken.append(address)
        return None

    def _reserve_address(self, address: str, port: int) -> str | None:
        for _ in range(2):  # once more when the holder let go between our bind and our question
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.bind(_name(address, port))
                sock.listen(_BACKLOG)
            except OSError as exc:
                sock.close()
                if exc.errno != errno.EADDRINUSE:
                    self._cannot_hold(exc)
                    return None
                holder = reservation_holder(address, port)
                if holder is not None:
                    return holder
                continue
            holder = self._overlap_holder(address, port)
            if holder is not None:  # looked for after holding ours: of two launchers at once, one sees the other
                sock.close()
                return holder
            self._held[(address, port)] = sock
            answerer.add(sock)
            return None
        return "its launcher let go of the port and took it again while asked which it is"

    def _overlap_holder(self, address: str, port: int) -> str | None:
        """Who holds `port` on an address overlapping `address`, other than this deployment: one of its own
        processes on such an address collides in its TCP bind, as it did before ports were held."""
        ours = {_name(h, p) for h, p in self._held}
        for name in _overlapping(address, port):
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

    def _let_go(self, address: str, port: int) -> None:
        sock = self._held.pop((address, port), None)
        if sock is not None:
            answerer.close(sock)

    def release_port(self, host: str, port: int) -> None:
        """Give back host:port on every address of `host`."""
        for address in _addresses(host):
            self._let_go(address, port)

    def release(self) -> None:
        """Give every name back: the deployment has stopped (its children's ports are closed)."""
        for address, port in list(self._held):
            self._let_go(address, port)

    @property
    def held(self) -> list[tuple[str, int]]:
        return sorted(self._held)

    def __del__(self) -> None:  # a plan dropped without a stop (a failed start): no ResourceWarning, names freed;
        # at the interpreter's shutdown without waiting on the answer thread (reservation_answers.Answerer.close)
        self.release()
