"""The waits of a TP group's rendezvous before torch's own join, each bounded by parallel.rendezvous_timeout_seconds.

Every rank other than 0 sets its joining key in rank 0's store, then waits for rank 0 to open the group (OPEN_KEY).
Rank 0 waits until every rank set its key (wait_for_joins) and only then opens it and joins: torch's join waits only
COLLECTIVE_TIMEOUT_S (the group's collective timeout) for its peers, so no rank ever waits inside it on a rank that
is still starting (an early local worker on a rank whose node or pod is minutes late). A wait that expires names the
ranks that had not come, how long it waited and the setting that raises it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

from pdlaunch.errors import EngineError

RENDEZVOUS_SETTING = "parallel.rendezvous_timeout_seconds"
JOIN_POLL_S = 0.2  # while rank 0 waits for the others to come to the join, how often it looks at the store


def joining_key(rank: int) -> str:
    """The store key rank `rank` sets just before it joins: rank 0 waits for every rank's (wait_for_joins)."""
    return f"pdlaunch/joining/{rank}"


OPEN_KEY = "pdlaunch/open"  # set by rank 0 once every rank came to the join: torch's join may begin


def _not_joined(store: dist.Store, size: int) -> list[int]:
    return [r for r in range(1, size) if not store.check([joining_key(r)])]


def wait_for_open(store: dist.Store, rank: int, size: int, rendezvous: str, rendezvous_timeout_s: float) -> None:
    """Wait until rank 0 opens the group (OPEN_KEY). Rank 0 waits up to `rendezvous_timeout_s` for its ranks to
    connect (ranks on other nodes), then as long for them all to come to the join, so this waits twice that. Raises
    EngineError naming the ranks that had not come, the wait and the setting; or that rank 0's store is gone."""
    timeout_s = 2 * rendezvous_timeout_s
    try:
        store.wait([OPEN_KEY], timedelta(seconds=timeout_s))
        return
    except dist.DistNetworkError as exc:  # rank 0 hosts the store: it gave up, or failed
        raise EngineError(f"TP rank {rank}: rank 0's rendezvous store at {rendezvous} went away before rank 0 opened "
                          f"the {size}-rank group: {(str(exc) or type(exc).__name__).splitlines()[0]}",
                          field="parallel.tp", hint="rank 0 failed or gave up waiting for a rank: see its log, "
                          "which names the rank") from None
    except (RuntimeError, dist.DistError) as exc:
        waited = exc
    try:
        late = _not_joined(store, size)
        missing = (f"{', '.join(f'TP rank {r}' for r in late)} had not come to the join" if late
                   else "every rank came to the join, yet rank 0 did not open it (see its log)")
    except (RuntimeError, dist.DistError):
        missing = "which ranks came is unknown (the store stopped answering)"
    raise EngineError(f"TP rank {rank}: rank 0 did not open the {size}-rank group at {rendezvous} within "
                      f"{timeout_s:g}s of this rank coming to join (twice {RENDEZVOUS_SETTING}, "
                      f"{rendezvous_timeout_s:g}s: rank 0 waits that long for the ranks to connect, then to come); "
                      f"{missing}", field=RENDEZVOUS_SETTING,
                      hint=f"a rank whose node or pod starts late (an image pull, a pod waiting to be scheduled) "
                      f"needs a larger {RENDEZVOUS_SETTING}, the same on every node") from waited


def wait_for_joins(store: dist.Store, size: int, timeout_s: float, watch: Callable[[float], None]) -> None:
    """Return once ranks 1..size-1 have all come to the join, so rank 0 never waits inside torch's join
    (blind for COLLECTIVE_TIMEOUT_S) on a rank that died before it got there. `watch(seconds)` waits up to
    that long for another rank to end and raises naming it; EngineError after `timeout_s`
    (parallel.rendezvous_timeout_seconds) names the ranks that never came and the setting."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = _not_joined(store, size)
        if not missing:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ranks = ", ".join(f"TP rank {r}" for r in missing)
            raise EngineError(f"{ranks} did not come to join the {size}-rank group within {timeout_s:g}s "
                              f"({RENDEZVOUS_SETTING}; alive, but still starting)", field=RENDEZVOUS_SETTING,
                              hint=f"see that rank's log: a slow device or import, or a stuck node; raise "
                              f"{RENDEZVOUS_SETTING} where a rank's node or pod starts late (an image pull)")
        watch(min(JOIN_POLL_S, remaining))
