"""KV resharding: a decode rank loads its KV heads from prefill ranks of another TP size.

Heads: a model has K KV heads; rank r of a TP-T instance holds heads [r*K/T, (r+1)*K/T) when T <= K,
else the single head r*K//T (replicated on T/K consecutive ranks, model/parallel_linear.py).
A head slice is not contiguous inside a block ([layers, 2, block_size, heads, head_dim]), so a
decode rank READs whole prefill blocks (MiB-sized descriptors) into registered staging slots shaped
like a prefill block, then copies its head slice into its own blocks (a strided device copy).

- decode TP larger (P1/D2): decode rank r reads prefill rank r*Tp//Td and takes part of its heads;
  several decode ranks read the same prefill rank, so every read_done names how many readers the
  prefill rank waits for before freeing the request.
- prefill TP larger (P2/D1): decode rank r gathers from several prefill ranks, each supplying its heads
  into the matching range of the decode block.
- a prefill rank nobody reads (its heads are replicas read elsewhere) is still told, by one decode
  rank, that it may free the request.
The prefill rank counts those notifications against the same plan (`expected_readers`, from the layout the decode's
handshake stated: prefill/reader_plans.py), not against the count a notification names.
Only pull: the decode side needs the whole remote block before it can slice it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

from pdlaunch.errors import KVTransferError
from pdlaunch.kv_transfer.params import MAX_TP
from pdlaunch.kv_transfer.remote_kv import RemoteKV


def kv_head_range(rank: int, tp: int, total: int) -> tuple[int, int]:
    """(first global KV head, number of heads) held by `rank` of a TP-`tp` instance."""
    if tp <= total:
        per = total // tp
        return rank * per, per
    return rank * total // tp, 1


def total_kv_heads(tp_a: int, heads_a: int, tp_b: int, heads_b: int) -> int:
    """The model's KV heads from both sides' (TP size, heads per rank).

    A side with more than one head per rank is not replicated: K = tp * heads. With one head per
    rank on both sides K is ambiguous, but any K dividing both TP sizes pairs the same ranks (the
    source of decode rank r is then prefill rank r*Tp//Td), so min(Tp, Td) stands in for it.
    """
    totals = {tp * h for tp, h in ((tp_a, heads_a), (tp_b, heads_b)) if h > 1}
    total = min(totals) if totals else min(tp_a, tp_b)
    for tp, heads in ((tp_a, heads_a), (tp_b, heads_b)):
        if len(totals) > 1 or (tp % total and total % tp) or heads != max(1, total // tp):
            raise KVTransferError(
                f"KV heads cannot be mapped: prefill holds {heads_a} KV heads per rank at TP {tp_a}, "
                f"decode {heads_b} per rank at TP {tp_b}",
                field="parallel.decode_tp",
                hint="serve the same model on prefill and decode with TP sizes that divide each other "
                "(pdlaunch check-config tells)",
            )
    return total


@dataclass(frozen=True)
class HeadSlice:
    """Heads [src_head, +count) of a source rank's block go to heads [dst_head, +count) of mine."""

    src_rank: int
    src_head: int
    dst_head: int
    count: int


def plan_head_slices(rank: int, tp: int, tp_src: int, total: int) -> list[HeadSlice]:
    """Where each KV head of decode rank `rank` comes from (preferring source rank rank*tp_src//tp)."""
    start, count = kv_head_range(rank, tp, total)
    preferred = rank * tp_src // tp
    slices: list[HeadSlice] = []
    for head in range(start, start + count):
        holders = [p for p in range(tp_src) if kv_head_range(p, tp_src, total)[0] <= head
                   < sum(kv_head_range(p, tp_src, total))]
        src = preferred if preferred in holders else holders[0]
        src_head = head - kv_head_range(src, tp_src, total)[0]
        last = slices[-1] if slices else None
        if last is not None and last.src_rank == src and last.src_head + last.count == src_head:
            slices[-1] = HeadSlice(src, last.src_head, last.dst_head, last.count + 1)
        else:
            slices.append(HeadSlice(src, src_head, head - start, 1))
    return slices


def notifying_ranks(tp: int, tp_src: int, total: int) -> dict[int, list[int]]:
    """Source rank -> the decode ranks that send it one notification per request (read_done or
    release): its readers, or for a source nobody reads, decode rank src*tp//tp_src."""
    out: dict[int, list[int]] = {p: [] for p in range(tp_src)}
    for r in range(tp):
        for p in sorted({s.src_rank for s in plan_head_slices(r, tp, tp_src, total)}):
            out[p].append(r)
    for p, ranks in out.items():
        if not ranks:
            ranks.append(p * tp // tp_src)
    return out


@lru_cache(maxsize=256)
def expected_readers(rank: int, tp: int, heads: int, decode_tp: int, decode_heads: int) -> int | None:
    """How many ranks of a decode of TP `decode_tp` (`decode_heads` KV heads per rank) send prefill rank `rank` (of
    TP `tp`, `heads` KV heads per rank) one read_done/release per request: 1 without resharding (same TP), else what
    `plan_reshard` gives each of those decode ranks as that source's `readers`. None: their heads cannot be mapped
    (`plan_reshard` refuses such params, and the decode cancels its load instead of notifying)."""
    if decode_tp == tp:
        return 1
    try:
        total = total_kv_heads(tp, heads, decode_tp, decode_heads)
    except KVTransferError:
        return None
    return len(notifying_ranks(decode_tp, tp, total)[rank])


@lru_cache(maxsize=64)
def plausible_readers(rank: int, tp: int, heads: int) -> frozenset[int]:
    """The `readers` some decode of TP at most MAX_TP may name to prefill rank `rank` (`expected_readers` over every
    decode layout that fits this prefill's heads): what a notification from a decode whose layout is unknown here
    may name. With more than one head per rank the model has tp * heads KV heads; with one, at most tp of them."""
    found = set()
    for decode_tp in range(1, MAX_TP + 1):
        if heads > 1:
            decode_heads = [max(1, tp * heads // decode_tp)]
        else:  # a decode with more than one head per rank holds at most the tp heads of the model
            decode_heads = list(range(1, max(1, tp // decode_tp) + 1))
        for h in decode_heads:
            readers = expected_readers(rank, tp, heads, decode_tp, h)
            if readers is not None:
                found.add(readers)
    return frozenset(found)


@dataclass
class Source:
    """One prefill rank this decode rank talks to for a request."""

    rank: int
    remote: RemoteKV  # the request's KV on this rank (its side channel, tp_rank set)
    slices: list[HeadSlice]  # empty: nothing to read, only tell it to free
    readers: int  # notifications that prefill rank waits for
    checksums: list[list[str]] | None  # that rank's per-group block digests (verify_kv)


@dataclass
class ReshardPlan:
    remote_tp: int
    remote_heads: int  # KV heads per prefill rank
    sources: list[Source] = field(default_factory=list)


def plan_reshard(remote: RemoteKV, rank: int, tp: int, heads: int) -> ReshardPlan:
    """The sources of decode rank `rank` (TP `tp`, `heads` KV heads per rank) for a request whose
    prefill instance has another TP size (kv_transfer_params carry tp_size, kv_heads_per_rank, and
    per-rank remote_ports / rank_kv_checksums when it has several ranks)."""
    remote_tp = remote.tp_size
    if remote.kv_heads_per_rank is None:
        raise KVTransferError(f"prefill TP {remote_tp} differs from decode TP {tp} but the prefill side did not say "
                              "how many KV heads each of its ranks holds (kv_heads_per_rank)",
                              hint="run the same pdlaunch version on prefill and decode")
    remote_heads = remote.kv_heads_per_rank
    ports = remote.rank_ports or [remote.port]
    if len(ports) != remote_tp:
        raise KVTransferError(f"prefill sent {len(ports)} side-channel ports for TP {remote_tp}",
                              hint="run the same pdlaunch version on prefill and decode")
    sums = remote.rank_checksums or ([remote.checksums] if remote.checksums is not None else None)
    total = total_kv_heads(remote_tp, remote_heads, tp, heads)
    slices = plan_head_slices(rank, tp, remote_tp, total)
    plan = ReshardPlan(remote_tp, remote_heads)
    for p, ranks in notifying_ranks(tp, remote_tp, total).items():
        if rank not in ranks:
            continue
        plan.sources.append(Source(
            rank=p, remote=remote.model_copy(update={"port": ports[p], "tp_rank": p, "checksums": None}),
            slices=[s for s in slices if s.src_rank == p], readers=len(ranks),
            checksums=sums[p] if sums is not None else None,
        ))
    return plan
