"""The TP group of one instance: rendezvous, backends, and the small collectives the engine needs.

Rank 0 (the engine process) hosts the rendezvous store. With no configured port it binds port 0,
so the OS picks a free one and two instances can never collide; the port is then handed to the
worker processes it spawns. The model's collectives run on the default group (gloo on CPU, NCCL on
CUDA); a gloo group beside it carries host-side values (block counts, engine_id) on both.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from pdlaunch.errors import EngineError

log = logging.getLogger(__name__)

RENDEZVOUS_TIMEOUT_S = 120.0  # every rank must join within this (model loading happens after it)
COLLECTIVE_TIMEOUT_S = 60.0  # a collective that waits longer on a peer fails instead of hanging
JOIN_POLL_S = 0.2  # while rank 0 waits for the others to come to the join, how often it looks at the store


@dataclass
class TPGroup:
    """This process's place in its instance's TP group."""

    rank: int
    size: int
    backend: str  # "gloo" | "nccl"
    cpu_group: Any  # gloo group for host-side values

    def min_int(self, value: int) -> int:
        """The minimum of `value` over every rank."""
        t = torch.tensor([value], dtype=torch.long)
        dist.all_reduce(t, op=dist.ReduceOp.MIN, group=self.cpu_group)
        return int(t.item())

    def all_gather_object(self, value: Any) -> list[Any]:
        """`value` of every rank, in rank order."""
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, value, group=self.cpu_group)
        return out


def create_store(host: str, port: int | None, world_size: int) -> dist.TCPStore:
    """Rank 0's rendezvous store; port None or 0 lets the OS choose a free port (read `store.port`)."""
    try:
        return dist.TCPStore(host, port or 0, world_size, is_master=True,
                             timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S), wait_for_workers=False)
    except (RuntimeError, OSError) as exc:
        raise EngineError(f"cannot open the TP rendezvous at {host}:{port or 0}: {exc}", field="parallel.master_port",
                          hint="pick a free port (or leave parallel.master_port unset) and check parallel.master_addr"
                          ) from exc


def init_tp_group(rank: int, size: int, device: torch.device, host: str, port: int,
                  store: dist.TCPStore | None = None) -> TPGroup:
    """Join the instance's TP group (blocks until every rank joined, at most RENDEZVOUS_TIMEOUT_S)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if store is None:
        store = dist.TCPStore(host, port, size, is_master=False, timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S))
    kwargs: dict[str, Any] = {}
    if backend == "nccl":
        kwargs["device_id"] = device
    try:
        if rank > 0:
            store.set(joining_key(rank), "1")
        dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                                timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S), **kwargs)
        cpu_group = dist.new_group(backend="gloo", timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    except (RuntimeError, dist.DistError) as exc:
        if dist.is_initialized():
            destroy_tp_group()
        else:
            # The failed init drew the default group's name ("0", "1", ...) from a process-wide counter
            # that only destroying a group resets: a restart here would rendezvous under "1" while its
            # fresh worker ranks wait under "0".
            dist.distributed_c10d._world.group_count = 0
        # init_process_group waits for the peers with the group's timeout, not the store's.
        raise EngineError(f"TP rank {rank} could not join the {size}-rank group at {host}:{port} "
                          f"within {COLLECTIVE_TIMEOUT_S:.0f}s: {exc}", field="parallel.master_addr",
                          hint="another rank failed to start (see its log) or the address is unreachable") from exc
    log.info("TP rank %d/%d joined (%s, rendezvous %s:%d)", rank, size, backend, host, port)
    return TPGroup(rank=rank, size=size, backend=backend, cpu_group=cpu_group)


def joining_key(rank: int) -> str:
    """The store key rank `rank` sets just before it joins: rank 0 waits for every rank's (wait_for_joins)."""
    return f"pdlaunch/joining/{rank}"


def wait_for_joins(store: dist.Store, size: int, timeout_s: float, watch: Callable[[float], None]) -> None:
    """Return once ranks 1..size-1 have all come to the join, so rank 0 never waits inside torch's join
    (blind for COLLECTIVE_TIMEOUT_S) on a rank that died before it got there. `watch(seconds)` waits up to
    that long for another rank to end and raises naming it; EngineError after `timeout_s` names the ranks
    that never came."""
    deadline = time.monotonic() + timeout_s
    while True:
        missing = [r for r in range(1, size) if not store.check([joining_key(r)])]
        if not missing:
            return
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            ranks = ", ".join(f"TP rank {r}" for r in missing)
            raise EngineError(f"{ranks} did not come to join the {size}-rank group within {timeout_s:.0f}s "
                              "(alive, but still starting)", field="parallel.tp",
                              hint="see that rank's log: a slow device or import, or a stuck node")
        watch(min(JOIN_POLL_S, remaining))


def destroy_tp_group() -> None:
    """Leave the group (idempotent); NCCL resources must go before the process exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        try:
            dist.destroy_process_group()
        except (RuntimeError, ValueError) as exc:
            log.warning("destroying the TP group failed: %s", exc)
