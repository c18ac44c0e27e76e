"""What a failed use of a TP group's rendezvous says: a wait that ran out names how long it waited and for what; a
failure that came sooner says what failed and why, and how soon, never a timeout it did not wait.

A sooner failure is, most often, rank 0's store refusing or dropping the connection (rank 0 exited, and its port
closed with it: "Broken pipe", "Connection reset by peer"), or a peer refusing one. torch's own errors do not tell a
timeout from such a failure by type (a connect that timed out and a dropped connection are both DistNetworkError),
so the time the call took decides: torch starts its clock after ours, so a call its timeout ended took at least
that long.
"""

from __future__ import annotations

import torch.distributed as dist

from pdlaunch.errors import EngineError

TIMED_OUT_SHARE = 0.99  # of its timeout, how long a call must have taken to be said to have timed out (clock slack)
STORE_HINT = ("rank 0 hosts the store and may have exited: see its log; check that parallel.master_addr and the "
              "rendezvous port reach rank 0")


def reason_of(exc: BaseException) -> str:
    """What `exc` says, else its type."""
    return str(exc).strip() or type(exc).__name__


def timed_out(took_s: float, timeout_s: float) -> bool:
    return took_s >= timeout_s * TIMED_OUT_SHARE


def sooner(rendezvous: str, exc: BaseException, took_s: float, timeout_s: float) -> str:
    """What failed, how soon and why, for a failure that came before `timeout_s` ran out: the store, when torch's
    store client raised it, else the join."""
    what = f"rank 0's rendezvous store at {rendezvous}" if isinstance(exc, dist.DistNetworkError) else "the join"
    # "before its wait ran out", not "not a timeout": a shorter wait inside the join (a read of the store, which
    # has its own timeout) may be what ended it, and the reason then says so
    return f"{what} failed after {took_s:.1f}s, before its {timeout_s:.0f}s wait ran out: {reason_of(exc)}"


def join_failed(rank: int, size: int, rendezvous: str, exc: BaseException, took_s: float,
                timeout_s: float) -> EngineError:
    """TP rank `rank`'s join of the `size`-rank group through the store at `rendezvous` failed with `exc` after
    `took_s` seconds, the join allowing `timeout_s` (the group's collective timeout) for its peers."""
    if timed_out(took_s, timeout_s):
        return EngineError(f"TP rank {rank} could not join the {size}-rank group at {rendezvous} within "
                           f"{timeout_s:.0f}s: {reason_of(exc)}", field="parallel.master_addr",
                           hint="another rank failed to start (see its log) or the address is unreachable")
    return EngineError(f"TP rank {rank} could not join the {size}-rank group: "
                       f"{sooner(rendezvous, exc, took_s, timeout_s)}", field="parallel.master_addr", hint=STORE_HINT)


def store_unreached(rendezvous: str, exc: BaseException, took_s: float, timeout_s: float, field: str,
                    hint: str) -> EngineError:
    """A client of rank 0's store at `rendezvous` could not connect: `exc` after `took_s` seconds of the
    `timeout_s` it was allowed."""
    if timed_out(took_s, timeout_s):
        return EngineError(f"no TP rendezvous store answered at {rendezvous} within {timeout_s:.0f}s: "
                           f"{reason_of(exc)}", field=field, hint=hint)
    return EngineError(f"cannot reach the TP rendezvous store: {sooner(rendezvous, exc, took_s, timeout_s)}",
                       field=field, hint=hint)
