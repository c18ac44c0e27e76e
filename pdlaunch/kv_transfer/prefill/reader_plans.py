"""How many read_done/release notifications a decode load sends this prefill rank per request: from the layout its
decode stated when it shook hands (`ReaderPlans`), not from the count each notification names.

A resharding decode (reshard.py) has several of its ranks notify one prefill rank, and each notification names how
many (`readers`). That count is the decode's word, and the decode runs outside this process: a word naming 1024
where two ranks read kept the hold to its lease or its READ claim's cap (the blocks out of the free list all that
time), and one naming fewer than read let the first word free blocks another rank of the load still READ. So a hold
waits for the count the plan gives: the layout the decode's handshake stated (messages.py DecodeLayout), run through
the plan the decode runs (reshard.py `expected_readers`). A word that names another count is counted toward the
plan's, with a warning naming the decode, its load and the request.

One engine id may state more than one layout: a decode relaunched with another TP size under the same engine_id
(a launcher started again with kv_transfer.engine_id set names its instances "<base>-<name>" again, and nothing told
this prefill to forget the old one). Each layout then stands (the latest MAX_LAYOUTS_PER_ENGINE), and a load is
counted against the one its words name (their count is one of those layouts' plans: each incarnation's ranks name
their own), else against the largest, which never frees blocks a rank of either still READs. Keeping only the first
layout counted the relaunched decode against the old one's plan: one rank's read_done freed the blocks its other
ranks still READ (a silently wrong load), or its loads kept their blocks to their READ claims' caps.

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
# Distinct layouts one engine id keeps (module docstring): a relaunch under the same id states one more.
MAX_LAYOUTS_PER_ENGINE = 4


@dataclass(frozen=True)
class Plan:
    """What the handshakes of one decode engine imply for this rank."""

    counts: frozenset[int]  # notifications each of its loads sends this rank per request, by the layouts it stated
    basis: str  # where the counts come from, for warnings

    @property
    def readers(self) -> int:
        """The largest count: what a word naming none of them is counted toward (it frees no blocks early)."""
        return max(self.counts)


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
        self._layouts: OrderedDict[str, list[DecodeLayout]] = OrderedDict()  # by engine id, latest last
        self._lock = threading.Lock()

    def set_local(self, spec: KVCacheSpec) -> None:
        """This prefill rank's own split (once its KV cache is registered, before it answers any handshake)."""
        self.local = (spec.tp_rank, spec.tp_size, spec.num_kv_heads)
        plausible_readers(*self.local)  # worked out (and cached) here, not under the hold table's lock

    def learn(self, layout: DecodeLayout | None) -> None:
        """A decode shook hands with this rank stating `layout` (None: a client that reads nothing, a probe). The
        ranks of one decode engine state the same; another layout under a known engine id (a decode relaunched
        under it: module docstring) is kept beside the earlier ones, and logged."""
        if layout is None:
            return
        with self._lock:
            known = self._layouts.setdefault(layout.reader, [])
            self._layouts.move_to_end(layout.reader)
            while len(self._layouts) > self.limit:
                self._layouts.popitem(last=False)
            new = layout not in known
            earlier = [k for k in known if k != layout]
            known[:] = [*earlier, layout][-MAX_LAYOUTS_PER_ENGINE:]
        if new and earlier:
            logger.warning("decode engine %s shook hands stating TP %d with %d KV heads per rank, but it stated %s "
                           "before (relaunched with another TP size under the same engine_id?): each of its loads "
                           "is counted against the layout its notifications name, else the one that waits longest",
                           layout.reader, layout.tp_size, layout.kv_heads_per_rank,
                           ", ".join(f"TP {k.tp_size} with {k.kv_heads_per_rank}" for k in earlier))

    def layouts(self, engine_id: str) -> list[DecodeLayout]:
        """The layouts decode engine `engine_id` stated here, oldest first."""
        with self._lock:
            return list(self._layouts.get(engine_id, ()))

    def forget(self, engine_id: str) -> None:
        """Decode engine `engine_id` ended (prefill/side.py `forget_engine`)."""
        with self._lock:
            self._layouts.pop(engine_id, None)

    def plan(self, engine_id: str) -> Plan | None:
        """How many notifications each load of decode engine `engine_id` sends this rank; None when it has not
        shaken hands with this rank (or stated no layout), or no layout it stated can be mapped onto this rank's
        heads (its decode then notifies nothing: it cannot plan the load)."""
        with self._lock:
            layouts = list(self._layouts.get(engine_id, ()))
            if layouts:
                self._layouts.move_to_end(engine_id)
        if self.local is None:
            return None
        rank, tp, heads = self.local
        mapped = [(k, n) for k in layouts
                  if (n := expected_readers(rank, tp, heads, k.tp_size, k.kv_heads_per_rank)) is not None]
        if not mapped:
            return None
        counts, here = frozenset(n for _, n in mapped), f"notify this one (TP rank {rank} of {tp})"
        if len(mapped) == 1:
            (layout, readers), = mapped
            return Plan(counts, f"its handshake's layout (TP {layout.tp_size}, {layout.kv_heads_per_rank} KV heads "
                                f"per rank) has {readers} of its ranks {here}")
        stated = "; ".join(f"TP {k.tp_size}, {k.kv_heads_per_rank} KV heads per rank: {n}" for k, n in mapped)
        return Plan(counts, f"its handshakes' layouts ({stated}) have that many of its ranks {here}")

    def count(self, notif: ReadDone, plan: Plan | None, first: int | None) -> Count:
        """How to count `notif` (of a load whose first counted notification named `first`, None: this is its first):
        toward `plan` (this decode's, `plan()`: the count of one of its layouts, the one `first` or this word names,
        else the largest), else toward `first`, else toward its own count when some decode layout has that many
        ranks notify this one; else not at all."""
        if plan is not None:  # the load's count, once settled, else the one its word names, else the longest wait
            wait = next((n for n in (first, notif.readers) if n in plan.counts), plan.readers)
            basis = plan.basis
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
