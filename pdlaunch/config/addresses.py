"""Host addresses in the config: syntax (any host), and for the ones this machine binds, that they
resolve and belong to it, so a bad address is reported as such and not as "port already in use";
and whether a port on one of them is free now (the launcher's ports and check-config's warning); on another
node's address, whether something listens at a port (a TCP connect: check-config's other nodes).
"""

from __future__ import annotations

import concurrent.futures
import errno
import functools
import ipaddress
import os
import re
import selectors
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Annotated, Literal, cast

from pydantic import AfterValidator

from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError

RESOLVE_TIMEOUT_S = 5.0
# RFC 1123 labels; `_` is accepted because container runtimes name hosts with it.
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
HOST_FIX = "use an IP address (127.0.0.1 this machine only, 0.0.0.0 every interface) or a host name like node1.example"


def url_host(host: str) -> str:
    """`host` as a URL or a `host:port` writes it: an IPv6 literal in brackets (`[fd00::2]`)."""
    return f"[{host}]" if ":" in host else host


def host_port(host: str, port: int) -> str:
    """`host:port`, an IPv6 literal bracketed (`[fd00::2]:8000`), as URLs, connect strings and messages write it."""
    return f"{url_host(host)}:{port}"


def is_wildcard(host: str) -> bool:
    """Whether a server bound at `host` takes its port on every address of the machine: 0.0.0.0 or ::, however
    written (`::0`, `0:0:0:0:0:0:0:0`; `::ffff:0.0.0.0`, 0.0.0.0 mapped into IPv6, every IPv4 address), or empty
    (uvicorn's and the socket module's every-interface)."""
    if not host:
        return True
    try:
        return unmapped(ipaddress.ip_address(host)).is_unspecified
    except ValueError:
        return False


def unmapped(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """`ip`, or the IPv4 address an IPv4-mapped IPv6 one (`::ffff:127.0.0.1`) stands for: a bind there is a bind on
    that IPv4 address (the kernel refuses one while the other is bound)."""
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return ip if mapped is None else mapped


def canonical_address(address: str) -> str:
    """An IP address in its one spelling as a bind takes it: ipaddress's (`0:0:0:0:0:0:0:1` is `::1`, `::0` is `::`),
    an IPv4-mapped one (`::ffff:127.0.0.1`) its IPv4 address. Raises ValueError for what is no IP address."""
    return str(unmapped(ipaddress.ip_address(address)))


@functools.lru_cache(maxsize=256)
def host_addresses(host: str) -> tuple[str, ...]:
    """Every IP address a server bound at `host` may take, each in canonical_address's spelling, sorted: an IP
    address itself; a host name every address it resolves to within RESOLVE_TIMEOUT_S (`localhost`: 127.0.0.1, and
    ::1 too where /etc/hosts lists both); () when it does not resolve. A name is looked up once a process: a
    launcher's hosts do not move while it runs, and a free pick asks about every port it tries."""
    try:
        return (canonical_address(host),)
    except ValueError:
        pass
    try:
        found = _resolve_in_time(host)
    except (concurrent.futures.TimeoutError, OSError, UnicodeError):  # socket.gaierror is an OSError
        return ()
    return tuple(sorted({canonical_address(sockaddr[0]) for _, sockaddr in found}))


def host_syntax_error(value: str) -> str | None:
    """Why `value` is neither an IP literal nor a host name, or None when it is one."""
    try:
        ipaddress.ip_address(value)
        return None
    except ValueError:
        pass
    if not value:
        return "an empty address"
    if value.startswith("[") and value.endswith("]"):
        return f"{value!r} has brackets (write an IPv6 address without them)"
    name = value[:-1] if value.endswith(".") else value
    labels = name.split(".")
    if len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        return f"{value!r} is not an IP address or host name"
    if all(label.isdigit() for label in labels):
        return f"{value!r} is not a valid IPv4 address"
    return None


def _check_host(value: str) -> str:
    reason = host_syntax_error(value)
    if reason is not None:
        raise ValueError(f"{reason}; {HOST_FIX}")
    return value


Host = Annotated[str, AfterValidator(_check_host)]


def _resolve(host: str) -> list[tuple[int, tuple[str, int]]]:
    infos = socket.getaddrinfo(host, 0, type=socket.SOCK_STREAM)
    return [(family, sockaddr[:2]) for family, _, _, _, sockaddr in infos]  # type: ignore[misc]


def _resolve_in_time(host: str) -> list[tuple[int, tuple[str, int]]]:
    """_resolve within RESOLVE_TIMEOUT_S (_resolved_within): raises concurrent.futures.TimeoutError past it, and
    what getaddrinfo raises."""
    found = _resolved_within({host}).get(host)
    if found is None:
        raise concurrent.futures.TimeoutError(f"{host} did not resolve within {RESOLVE_TIMEOUT_S:.0f}s")
    if isinstance(found, BaseException):
        raise found
    return found


def _resolved_within(hosts: set[str]) -> dict[str, list[tuple[int, tuple[str, int]]] | BaseException]:
    """Each host's _resolve, or the exception it raised, all looked up at once; a host missing did not resolve
    within RESOLVE_TIMEOUT_S. Each lookup runs on a daemon thread, left behind when it hangs: the workers of a
    ThreadPoolExecutor are joined at the interpreter's exit, and `check-config --host NAME` said "did not resolve
    within 5s", then sat until getaddrinfo gave up (40 s, or for good)."""
    found: dict[str, list[tuple[int, tuple[str, int]]] | BaseException] = {}

    def look_up(host: str) -> None:
        try:
            found[host] = _resolve(host)
        except Exception as exc:  # noqa: BLE001 (socket.gaierror, UnicodeError: handed to the caller)
            found[host] = exc

    threads = [threading.Thread(target=look_up, args=(host,), name=f"resolve {host}", daemon=True) for host in hosts]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + RESOLVE_TIMEOUT_S
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return {host: found[host] for host in hosts if host in found}


def bind_problem(field: str, host: str) -> Problem | None:
    """Whether a server on this machine can bind `host`: it resolves (within RESOLVE_TIMEOUT_S) and is
    one of this machine's addresses. Ports are not the question here (port 0 is bound)."""
    try:
        addresses = _resolve_in_time(host)
    except concurrent.futures.TimeoutError:
        return problem(field, f"{host!r} did not resolve within {RESOLVE_TIMEOUT_S:.0f}s", HOST_FIX)
    except (socket.gaierror, UnicodeError) as exc:
        return problem(field, f"{host!r} does not resolve on this machine ({exc})",
                       "use an IP address, or a name listed in /etc/hosts or DNS")
    family, sockaddr = addresses[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((sockaddr[0], 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                shown = host if host == sockaddr[0] else f"{host} ({sockaddr[0]})"
                return problem(field, f"{shown} is not an address of this machine",
                               "bind 127.0.0.1 (this machine only), 0.0.0.0 (every interface) or one of "
                               "this machine's own addresses")
            return problem(field, f"cannot bind {host!r}: {exc.strerror or exc}", HOST_FIX)
    return None


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


PROBE_TIMEOUT_S = 1.5  # per batch of connects: a node on the cluster's network answers in milliseconds
_PROBE_BATCH = 256  # sockets open at once, well below the usual limit of 1024 descriptors
_WAITING = (errno.EINPROGRESS, errno.EAGAIN, errno.EWOULDBLOCK)


@dataclass(frozen=True)
class PortAnswer:
    """How host:port answered a TCP connect: `listening` (it accepted), `free` (refused) or `unreached`
    (no answer within the timeout, no route, a name that does not resolve: `reason` says which)."""

    state: Literal["listening", "free", "unreached"]
    reason: str = ""


def probe_ports(targets: Iterable[tuple[str, int]], timeout_s: float = PROBE_TIMEOUT_S
                ) -> dict[tuple[str, int], PortAnswer]:
    """Whether something listens at each host:port of another machine, by a TCP connect closed at once:
    nothing is bound and nothing is sent. All connects of a batch run at once, so one batch takes
    `timeout_s` at most whatever the count (host names resolve first, within RESOLVE_TIMEOUT_S)."""
    wanted = list(dict.fromkeys(targets))
    addresses = _resolve_all({host for host, _ in wanted})
    answers: dict[tuple[str, int], PortAnswer] = {}
    reachable: list[tuple[tuple[str, int], tuple[int, tuple[str, int]]]] = []
    for host, port in wanted:
        found = addresses[host]
        if isinstance(found, PortAnswer):
            answers[(host, port)] = found
        else:
            reachable.append(((host, port), (found[0], (found[1][0], port))))
    for start in range(0, len(reachable), _PROBE_BATCH):
        answers.update(_connect_batch(reachable[start:start + _PROBE_BATCH], timeout_s))
    return answers


def _resolve_all(hosts: set[str]) -> dict[str, tuple[int, tuple[str, int]] | PortAnswer]:
    """Each host's first address (as bind_problem takes it), or why it has none; all looked up at once."""
    if not hosts:
        return {}
    looked_up = _resolved_within(hosts)
    found: dict[str, tuple[int, tuple[str, int]] | PortAnswer] = {}
    for host in hosts:
        result = looked_up.get(host)
        if result is None:
            found[host] = PortAnswer("unreached", f"{host} did not resolve within {RESOLVE_TIMEOUT_S:.0f}s")
        elif isinstance(result, BaseException):  # socket.gaierror, or UnicodeError for a label too long for IDNA
            found[host] = PortAnswer("unreached", f"{host} does not resolve here ({result})")
        else:
            found[host] = result[0]
    return found


def _connect_batch(batch: list[tuple[tuple[str, int], tuple[int, tuple[str, int]]]], timeout_s: float
                   ) -> dict[tuple[str, int], PortAnswer]:
    """Non-blocking connects to every (key, (family, sockaddr)) of `batch`, waited for together."""
    answers: dict[tuple[str, int], PortAnswer] = {}
    with selectors.DefaultSelector() as selector:
        try:
            for key, (family, sockaddr) in batch:
                sock = socket.socket(family, socket.SOCK_STREAM)
                sock.setblocking(False)
                code = sock.connect_ex(sockaddr)
                if code in _WAITING:
                    selector.register(sock, selectors.EVENT_WRITE, key)
                    continue
                answers[key] = _answer(sock, code)
                sock.close()
            deadline = time.monotonic() + timeout_s
            while selector.get_map() and (left := deadline - time.monotonic()) > 0:
                for ready, _ in selector.select(left):
                    sock = cast(socket.socket, ready.fileobj)
                    selector.unregister(sock)
                    answers[ready.data] = _answer(sock, sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR))
                    sock.close()
        finally:
            for ready in list(selector.get_map().values()):
                answers.setdefault(ready.data, PortAnswer("unreached", f"no answer within {timeout_s:g}s"))
                selector.unregister(ready.fileobj)
                cast(socket.socket, ready.fileobj).close()
    return answers


def _answer(sock: socket.socket, code: int) -> PortAnswer:
    if code == errno.ECONNREFUSED:
        return PortAnswer("free")
    if code != 0:
        return PortAnswer("unreached", os.strerror(code))
    try:
        if sock.getsockname() == sock.getpeername():  # TCP's self-connect: this socket, on a free local port
            return PortAnswer("free")
    except OSError:  # the listener accepted, then reset the connection already
        pass
    return PortAnswer("listening")
