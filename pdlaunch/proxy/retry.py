"""One retry on another instance when the picked one refused the connection.

A refused connection means the request never reached the instance (it died, or restarts on its
port): sending it to another live instance of the same role is safe and hides the kill from the
client (with 2 prefill + 2 decode, 1-2 requests per kill failed before). Nothing else is retried:
a timeout or a dropped connection may have run the request already, and a streamed answer is
never retried once any byte reached the client (the retry happens before the stream opens).
"""

from __future__ import annotations

import logging
from typing import Awaitable, Callable, TypeVar

from pdlaunch.proxy.instances import Instance, InstancePool
from pdlaunch.server.errors import OpenAIError

log = logging.getLogger("pdlaunch.proxy")

T = TypeVar("T")
REFUSED_CODE = "instance_unreachable"  # translate.error_from_exception's code for a failed connect


async def on_live_instance(pool: InstancePool, role: str, first: Instance,
                           call: Callable[[Instance], Awaitable[T]]) -> tuple[Instance, T]:
    """(instance that answered, its result): `call(first)`, or, when `first` refused the connection,
    `call` once on another ready instance of `role`. The first error stands when there is none."""
    try:
        return first, await call(first)
    except OpenAIError as exc:
        if exc.code != REFUSED_CODE:
            raise
        others = [i for i in pool.instances if i.role == role and i.state == "ready" and i is not first]
        if not others:
            raise
        second = pool.policy.choose(role, others)
        log.info("%s refused the connection; retrying on %s", first.name, second.name)
        return second, await call(second)
