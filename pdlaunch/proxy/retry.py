"""One retry on another instance when the picked one is gone.

An instance that refused the connection, or dropped it before answering, is dead or restarting (the
proxy marks it down at once), and so is one that answered 503 shutting_down (it is stopping: SIGTERM, its pod
deleted; translate.is_shutting_down): sending the leg to another live instance of the same role hides the
kill or the stop from the client (with 2 prefill + 2 decode, 1-2 requests per kill failed before; a killed
process often leaves a pooled keep-alive connection that drops on the next request rather than
refusing it). Running a leg twice is safe: generation has no side effect, and a prefill's KV held for
a leg that died with its instance is gone with it. Nothing else is retried: a timeout may be a slow
instance, any other error answer is the instance's word, and a streamed answer is never retried once any
byte reached the client (this runs before the stream is handed to the client). A prefill leg that
outlives its own deadline (a stalled instance) is retried by prefill_leg.py.

With no other ready instance of the role (or the other gone too) the error stands, and the caller decides: a decode
leg's goes to its client (503 instance_unreachable or shutting_down, 502 for a dropped connection), while a prefill
leg's prompt is left to the decode, which computes it itself, under kv_transfer.load_failure_policy recompute, or the
request fails with a 503 no_instance naming the policy under fail (prefill_leg.py), as when no prefill was ready at
all.

Only a refused connection says the instance never got the leg. One that dropped the connection, or answered
shutting_down (mostly a leg the end of its drain cut: it ran until then), may have begun it: a decode leg's decode
may have read the prefill's KV, and the prefill freed that hold at its read_done, so the same kv_transfer_params
would fail the next decode's load (kv_transfer.load_failure_policy fail: the request fails; recompute: a refused
claim, then the prompt computed). The caller says how such a leg goes again (`Afresh`): a decode leg goes as a
migration does (migrate.py `fresh_leg`), the client's request without the params and the prefill's hold released,
and the new decode computes the prompt. Either way the retry counts in pdlaunch_proxy_legs_retried (reason
instance_gone) and is logged.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from pdlaunch.http.errors import OpenAIError
from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.proxy.translate import DroppedConnection, is_shutting_down

log = logging.getLogger("pdlaunch.proxy")

T = TypeVar("T")
REFUSED_CODE = "instance_unreachable"  # translate.error_from_exception's code for a failed connect


def gone(exc: OpenAIError) -> bool:
    """The instance refused the connection, dropped it before answering (translate.DroppedConnection), or answered
    that it is shutting down."""
    return exc.code == REFUSED_CODE or isinstance(exc, DroppedConnection) or is_shutting_down(exc)


def refused(exc: OpenAIError) -> bool:
    """The instance refused the connection: it never got the request."""
    return exc.code == REFUSED_CODE


@dataclass(frozen=True)
class Afresh(Generic[T]):
    """How a leg goes to another instance when the gone one may have begun it (dropped the connection, or answered
    shutting_down): `call`, in place of the leg's own; `without` names what it goes without, for the log."""

    call: Callable[[Instance], Awaitable[T]]
    without: str


async def on_live_instance(pool: InstancePool, role: str, first: Instance,
                           call: Callable[[Instance], Awaitable[T]],
                           afresh: Afresh[T] | None = None) -> tuple[Instance, T]:
    """(instance that answered, its result): `call(first)`, or, when `first` is gone (refused or
    dropped the connection, or answered shutting_down), `call` once on another ready instance of `role`;
    `afresh.call` instead where given and `first` did not refuse the connection (it may have begun the leg).
    The first error stands when there is none (a prefill leg's then falls back: prefill_leg.py)."""
    try:
        return first, await call(first)
    except OpenAIError as exc:
        if not gone(exc):
            raise
        others = [i for i in pool.instances if i.role == role and i.state == "ready" and i is not first]
        if not others:
            raise
        second = pool.policy.choose(role, others)
        pool.on_retry(role, "instance_gone")
        if afresh is None or refused(exc):
            log.info("%s is gone (%s); retrying on %s", first.name, exc.code, second.name)
            return second, await call(second)
        log.info("%s is gone (%s) and may have begun the leg; retrying on %s without %s", first.name, exc.code,
                 second.name, afresh.without)
        return second, await afresh.call(second)
