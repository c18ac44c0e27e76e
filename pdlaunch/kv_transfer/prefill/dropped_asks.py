"""Decode loads that gave up asking "held_blocks" before this prefill held their request ("drop_held",
messages.py DropHeldRequest): vLLM's push proxy sends both legs at once, and a decode leg whose client left before
the prefill leg ended never learns of the hold it asked for. The hold of what such a load asked for, made within the
drop's time, ends as it is made (holds.py `HoldTable.hold`).

A client may send the same X-Request-Id and prompt again (a retry): a decode leg of it that asks "held_blocks" for
the same request takes the dropped ask back (`asked_again`, once per ask as it comes), so that the retry's hold is
kept for it. A retry whose
prefill leg ends before its decode leg first asks still loses its hold, and its decode recomputes (or fails under
load_failure_policy fail): the prefill does not know when a request arrived, only when its hold is made.

Not locked: the hold table calls it under its lock.
"""

from __future__ import annotations

from collections import OrderedDict

from pdlaunch.kv_transfer.prefill.hold import Hold
from pdlaunch.kv_transfer.push_params import client_request_id

# Dropped asks kept at once: the oldest go first.
MAX_DROPPED_ASKS = 1024

# How "held_blocks" and "drop_held" name a request: (its request id or None, the client's X-Request-Id, prompt digest).
AskedFor = tuple[str | None, str, str]
# What a dropped ask is kept under: by request id ("id", request id, digest) or by client ("client", X-Request-Id,
# digest), so that a hold made finds its own in two lookups.
_Key = tuple[str, str, str]


def named(hold: Hold, asked: AskedFor) -> bool:
    """Whether `hold` is the request a decode asked for: by request id if it named one, else by the client's
    X-Request-Id; only when its prompt's digest is the decode's (push_params.py)."""
    request_id, client_id, digest = asked
    by_name = hold.request_id == request_id if request_id else client_request_id(hold.request_id) == client_id
    return by_name and hold.prompt_digest == digest


def _key(asked: AskedFor) -> _Key:
    request_id, client_id, digest = asked
    return ("id", request_id, digest) if request_id else ("client", client_id, digest)


class DroppedAsks:
    """Dropped asks by what they asked for: (until when, time.monotonic(); the nonce of the load that dropped it)."""

    def __init__(self, lease_seconds: float) -> None:
        self.lease_seconds = lease_seconds
        self._asks: OrderedDict[_Key, tuple[float, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._asks)

    def add(self, asked: AskedFor, owner: str, seconds: float, now: float) -> None:
        """Load `owner` gave up asking for `asked`: its hold, made within `seconds` (at most the lease), ends."""
        key = _key(asked)
        self._asks[key] = (now + min(seconds, self.lease_seconds), owner)
        self._asks.move_to_end(key)
        while len(self._asks) > MAX_DROPPED_ASKS:
            self._asks.popitem(last=False)

    def asked_again(self, asked: AskedFor) -> None:
        """A decode asks "held_blocks" for `asked` (a retry of the same client request and prompt): its hold is
        wanted again."""
        self._asks.pop(_key(asked), None)

    def take(self, hold: Hold, now: float) -> str | None:
        """The nonce of the load that dropped the ask `hold` answers, if one did within its time (the ask is used
        up); None when none did."""
        if hold.prompt_digest is None:
            return None
        for key in (("id", hold.request_id, hold.prompt_digest),
                    ("client", client_request_id(hold.request_id), hold.prompt_digest)):
            found = self._asks.pop(key, None)
            if found is not None and found[0] >= now:
                return found[1]
        return None

    def expire(self, now: float) -> None:
        """Forget the asks whose time is up, from the oldest added: one added later with a shorter time waits for the
        ones before it (at most MAX_DROPPED_ASKS are kept anyway, and `take` looks at the time)."""
        while self._asks and next(iter(self._asks.values()))[0] < now:
            self._asks.popitem(last=False)
