"""How many read_done/release notifications a decode load sends this prefill rank per request: from the layout its
decode stated when it shook hands (`ReaderPlans`), not from the count each notification names.

A resharding decode (reshard.py) has several of its ranks notify one prefill rank, and each notification names how
many (`readers`). That count is the decode's word, and the decode runs outside this process: a word naming 1024
where two ranks read kept the hold to its lease or its READ claim's cap (the blocks out of the free list all that
time), and one naming fewer than read let the first word free blocks another rank of the load still READ. So a hold
waits for the count the plan gives: the layout the decode's handshake stated (messages.py DecodeLayout), run through
the plan the decode runs (reshard.py `expected_readers`). A word that names another count is counted toward the
plan's, with a warning naming the decode, its load and the request.

A decode that has not shaken hands with this rank (each handshake it tried failed, so its ranks send their releases
on the side channel) has no plan here; it READs nothing here either (a READ needs the handshake's metadata). Its
load waits for the count its first counted word named, when some decode layout gives this rank that many
(reshard.py `plausible_readers`); a first word naming a count none gives is not counted. A later word naming another
count than the first is counted toward the first's, with a warning.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass

from pdlaunch.kv_transfer.base import KVCacheSpec
from pdlaunch.kv_transfer.messages import DecodeLayout
from pdlaunch.kv_transfer.notifications import ReadDone
from pdlaunch.kv_transfer.reshard import expected_readers, plausible_readers

logger = logging.getLogger(__name__)

# Decode engines whose layout a prefill rank keeps; the least recently used goes first. A deployment has a few
# decodes, each a new engine id at each restart: this bounds what handshakes (of a peer that spoofs ids) can add.
MAX_DECODE_ENGINES = 4096


@dataclass(frozen=True)
class Plan:
    """What the handshake of one decode engine implies for this rank."""

    readers: int  # notifications each of its loads sends this rank per request
    basis: str  # where the count comes from, for warnings


@dataclass(frozen=True)
class Count:
    """How a notification is counted (`ReaderPlans.count`)."""

    wait: int | None  # notifications its load sends this rank (the hold waits for them); None: not counted
    problem: str | None = None  # why its `readers` was not taken (a warning), None when it agrees


class ReaderPlans:
    """The layout each decode engine stated in its handshake with this prefill rank (side-channel threads learn
    them, the engine thread and side-channel threads read them)."""

    def __init__(self, limit: int = MAX_DECODE_ENGINES) -> None:
        self.limit = limit
        self.local: tuple[int, int, int] | None = None  # this rank: (tp_rank, tp_size, KV heads per rank)
        self._layouts: OrderedDict[str, DecodeLayout] = OrderedDict()
        self._lock = threading.Lock()

    def set_local(self, spec: KVCacheSpec) -> None:
        """This prefill rank's own split (once its KV cache is registered, before it answers any handshake)."""
        self.local = (spec.tp_rank, spec.tp_size, spec.num_kv_heads)
        plausible_readers(*self.local)  # worked out (and cached) here, not under the hold table's lock

    def learn(self, layout: DecodeLayout | None) -> None:
        """A decode shook hands with this rank stating `layout` (None: a client that reads nothing, a probe). The
        ranks of one decode engine state the same; one that states another layout than its engine's first is
        logged and changes nothing (a restarted decode has a new engine id)."""
        if layout is None:
            return
        with self._lock:
            known = self._layouts.get(layout.reader)
            if known is None:
                self._layouts[layout.reader] = layout
                while len(self._layouts) > self.limit:
                    self._layouts.popitem(last=False)
            else:
                self._layouts.move_to_end(layout.reader)
        if known is not None and known != layout:
            logger.warning("decode engine %s shook hands stating TP %d with %d KV heads per rank, but it stated TP %d "
                           "with %d before: its notifications are still counted against the first", layout.reader,
                           layout.tp_size, layout.kv_heads_per_rank, known.tp_size, known.kv_heads_per_rank)

    def forget(self, engine_id: str) -> None:
        """Decode engine `engine_id` ended (prefill/side.py `forget_engine`)."""
        with self._lock:
            self._layouts.pop(engine_id, None)

    def plan(self, engine_id: str) -> Plan | None:
        """How many notifications each load of decode engine `engine_id` sends this rank; None when it has not
        shaken hands with this rank (or stated no layout), or its layout cannot be mapped onto this rank's heads
        (its decode then notifies nothing: it cannot plan the load)."""
        with self._lock:
            layout = self._layouts.get(engine_id)
            if layout is not None:
                self._layouts.move_to_end(engine_id)
        if layout is None or self.local is None:
            return None
        rank, tp, heads = self.local
        readers = expected_readers(rank, tp, heads, layout.tp_size, layout.kv_heads_per_rank)
        if readers is None:
            return None
        return Plan(readers, f"its handshake's layout (TP {layout.tp_size}, {layout.kv_heads_per_rank} KV heads per "
                             f"rank) has {readers} of its ranks notify this one (TP rank {rank} of {tp})")

    def count(self, notif: ReadDone, plan: Plan | None, first: int | None) -> Count:
        """How to count `notif` (of a load whose first counted notification named `first`, None: this is its first):
        toward `plan` (this decode's, `plan()`), else toward `first`, else toward its own count when some decode
        layout has that many ranks notify this one; else not at all."""
        if plan is not None:
            wait, basis = plan.readers, plan.basis
        elif first is not None:
            wait, basis = first, f"its load's first notification here named {first}"
        elif self.local is None or notif.readers in plausible_readers(*self.local):
            return Count(notif.readers)
        else:
            rank, tp, heads = self.local
            return Count(None, f"but no decode layout has that many ranks notify TP rank {rank} of {tp} ({heads} KV "
                               "heads per rank), and its decode has not shaken hands with this rank: not counted")
        if notif.readers == wait:
            return Count(wait)
        return Count(wait, f"but {basis}: counted as one of {wait}")
