"""One client request at the proxy: what every leg of it shares (`Call`), and the X-Request-Id a leg carries
when it needs one of its own (`suffixed`)."""

from __future__ import annotations

from dataclasses import dataclass

from pdlaunch.http.disconnect import DisconnectWatch
from pdlaunch.http.limits import MAX_REQUEST_ID_CHARS
from pdlaunch.proxy.state import ProxyState


@dataclass
class Call:
    """What every leg of one client request shares."""

    state: ProxyState
    path: str
    chat: bool
    deadline: float
    watch: DisconnectWatch
    made_request_id: bool  # the proxy made the X-Request-Id (the client sent none): no other request has it


def suffixed(request_id: str, suffix: str) -> str:
    """`request_id` with `suffix`, within the instances' X-Request-Id limit: the client's id (at most that
    long) is cut to fit, else the instances refuse the leg (logs still find it by its start)."""
    return request_id[:MAX_REQUEST_ID_CHARS - len(suffix)] + suffix
