"""Host addresses in the config: syntax (any host), and for the ones this machine binds, that they
resolve and belong to it, so a bad address is reported as such and not as "port already in use";
and whether a port on one of them is free now (the launcher's ports and check-config's warning).
"""

from __future__ import annotations

import concurrent.futures
import errno
import ipaddress
import re
import socket
from typing import Annotated

from pydantic import AfterValidator

from pdlaunch.config.problems import Problem, problem
from pdlaunch.errors import PdlaunchError

RESOLVE_TIMEOUT_S = 5.0
# RFC 1123 labels; `_` is accepted because container runtimes name hosts with it.
_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
HOST_FIX = "use an IP address (127.0.0.1 this machine only, 0.0.0.0 every interface) or a host name like node1.example"


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


def bind_problem(field: str, host: str) -> Problem | None:
    """Whether a server on this machine can bind `host`: it resolves (within RESOLVE_TIMEOUT_S) and is
    one of this machine's addresses. Ports are not the question here (port 0 is bound)."""
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=1)
    try:
        addresses = pool.submit(_resolve, host).result(timeout=RESOLVE_TIMEOUT_S)
    except concurrent.futures.TimeoutError:
        return problem(field, f"{host!r} did not resolve within {RESOLVE_TIMEOUT_S:.0f}s", HOST_FIX)
    except (socket.gaierror, UnicodeError) as exc:
        return problem(field, f"{host!r} does not resolve on this machine ({exc})",
                       "use an IP address, or a name listed in /etc/hosts or DNS")
    finally:
        pool.shutdown(wait=False)
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
