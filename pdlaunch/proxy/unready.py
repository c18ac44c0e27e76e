"""Why an instance gets no requests, in the words a client and an operator read: the 503 `no_instance` names each
instance of the role with its state and why (a client read only `no decode instance is ready (decode-0 unhealthy)`
while the launcher restarted it), and a /health refusal carries the state the instance says it is in."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Protocol

# A pdlaunch instance's /health says `status`: loading, sleeping, failed, ... Anything else (another server's page)
# is not quoted: the detail is shown to clients.
_STATE_WORD = re.compile(r"[a-z_]{1,32}")


class Unready(Protocol):
    """What these messages read of an instance (instances.py's Instance, which imports this module)."""

    @property
    def name(self) -> str: ...

    @property
    def state(self) -> str: ...

    @property
    def detail(self) -> str: ...


def health_refusal(status: int, body: dict[str, object]) -> str:
    """`/health answered 503 (loading)`, or without the state when the body names none."""
    state = body.get("status")
    said = f" ({state})" if isinstance(state, str) and _STATE_WORD.fullmatch(state) else ""
    return f"/health answered {status}{said}"


def none_ready_message(role: str, of_role: Sequence[Unready]) -> str:
    """Each instance of `role` with its state and why, and what the client does."""
    states = "; ".join(f"{i.name} {i.state}" + (f": {i.detail}" if i.detail else "") for i in of_role)
    return (f"no {role} instance is ready ({states or 'none configured'}); retry with backoff "
            "(GET /instances shows each instance's state)")
