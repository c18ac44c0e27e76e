"""Starting a TP group from its rank 0: the rendezvous, one worker process per local rank 1..T-1, a link to
every rank, rank 0's own shard, and every other rank's Ready.

Rank 0 joins the group only once every other rank has come to the join (parallel_state.wait_for_joins),
watching them meanwhile: a rank that dies on its way (an import, its device, its checkpoint) is named as it
exits, with the reason it sent, how it ended and where its log is (RankEnded).

A group spanning nodes (distributed/placement.py) spawns only this node's ranks; the others are started by
their node's launcher (remote_rank.py) and connect here over TCP (remote_link.py, to rank_listener.py's
listener). Rank 0 waits parallel.rendezvous_timeout_seconds for them to connect, then as long for every rank to
come to the join (join_waits.py); the error of either wait names the ranks that did not come and the setting.
"""

from __future__ import annotations

import multiprocessing as mp
import uuid
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed.join_waits import wait_for_joins
from pdlaunch.distributed.link_socket import is_closed, set_send_timeout
from pdlaunch.distributed.message_stream import MessageStalled, UnexpectedMessage, recv, send
from pdlaunch.distributed.messages import RankFailed, Ready, Setup
from pdlaunch.distributed.parallel_state import (
    LOCAL_STORE_HOST,
    READY_WAIT_S,
    SealedStore,
    StoreTampered,
    create_store,
    destroy_tp_group,
    fresh_store_key,
    store_key,
)
from pdlaunch.distributed.placement import RankPlacement, link_authkey
from pdlaunch.distributed.rank import RankState, build_rank
from pdlaunch.distributed.rank_listener import RankListener
from pdlaunch.distributed.tp_ranks import DEATH_REPORT_WAIT_S, TPRanks
from pdlaunch.distributed.worker import run_worker
from pdlaunch.errors import EngineError
from pdlaunch.model.checkpoint import Checkpoint

# A step's inputs can outgrow the socket buffers (~400 KiB): a rank that takes nothing of a message
# within this is failed (hung or stopped); "shutdown" gets a short bound (tp_ranks.py).
SEND_TIMEOUT_S = 60.0


class RankEnded(EngineError):
    """Another rank's failure while the group started, already named (its reason, how it ended, its log)."""


@dataclass(frozen=True)
class StartedGroup:
    ranks: TPRanks
    store: SealedStore  # rank 0 hosts it
    hosts: list[str]  # each rank's node address when the group spans nodes; else []
    rank0: RankState
    ready: list[Ready]  # ranks 1..T-1 in order


def start_group(config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
                device: torch.device, dtype: torch.dtype, max_model_len: int, dtype_name: str) -> StartedGroup:
    """Start the instance's TP group with this process as rank 0; on a failure, stop the ranks started and
    raise the failing rank's error (RankEnded) where another rank made this one fail."""
    tp_size = instance.tp if instance is not None else config.parallel.tp
    ranks = TPRanks(instance.name if instance is not None else "engine", tp_size,
                    in_pods=instance is not None and instance.pod is not None)
    placement = RankPlacement.from_env()
    hosts = list(placement.hosts) if placement is not None else []
    port = instance.master_port if instance is not None else config.parallel.master_port
    rendezvous_timeout_s = config.parallel.rendezvous_timeout_seconds
    # the store listens only where its ranks dial: loopback, or this node's address when ranks run elsewhere;
    # sealed either way (a local user reaches loopback). Ranks on other nodes derive the key from the deployment
    # secret; a group on one host gets a fresh one, which only the workers spawned here learn.
    store_host = placement.hosts[0] if placement is not None else LOCAL_STORE_HOST
    raw = create_store(store_host, port, tp_size)
    key = store_key(config, instance, raw.port) if placement is not None else fresh_store_key()
    store = SealedStore(raw, key)
    listener: RankListener | None = None
    links: dict[int, Connection] = {}
    try:
        if placement is not None and instance is not None:
            ranks.remote = {r: f"node {placement.nodes[r]} ({placement.hosts[r]})" for r in placement.remote_ranks()}
            listener = RankListener(placement.hosts[0], link_authkey(config, instance.name, raw.port))
            listener.publish(store)
        for rank in range(1, tp_size):
            if rank in ranks.remote:
                continue
            ranks.procs[rank], links[rank] = _spawn_worker(rank, config, instance, device.type, dtype_name,
                                                           max_model_len, store_host, raw.port, key)
        if listener is not None:
            links.update(listener.accept(ranks.remote, rendezvous_timeout_s))
        open_links(links, ranks.remote, Setup(device.type, dtype_name, max_model_len))
        ranks.links = [links[r] for r in range(1, tp_size)]
        wait_for_joins(store, tp_size, rendezvous_timeout_s, lambda s: _watch_startup(ranks, links, s))
        rank0 = build_rank(0, config, instance, checkpoint, device, dtype, max_model_len, raw.port, store)
        ready = [wait_ready(ranks, r) for r in range(1, tp_size)]
    except BaseException as exc:
        ranks.links = [links[r] for r in sorted(links)]
        # Rank 0's own error (a join or collective that timed out) hides why: the rank that failed. A tampered
        # store is the cause itself (the other ranks then fail on their own join).
        named = isinstance(exc, RankEnded | StoreTampered) or not isinstance(exc, Exception)
        failed = None if named else _startup_failure(ranks, links)
        ranks.stop()
        destroy_tp_group()
        if failed is not None:
            raise failed from exc
        raise
    finally:
        if listener is not None:
            listener.close()
    return StartedGroup(ranks, store, hosts, rank0, ready)


def _spawn_worker(rank: int, config: DeploymentConfig, instance: InstanceSpec | None, device_type: str,
                  dtype_name: str, max_model_len: int, store_host: str, store_port: int, key: bytes
                  ) -> tuple[BaseProcess, Connection]:
    """Start local rank `rank`'s worker process (worker.py), which joins the store at store_host:store_port
    sealed with `key`; its process, and rank 0's end of its pipe."""
    ctx = mp.get_context("spawn")
    parent_end, child_end = ctx.Pipe(duplex=True)
    worker_config, worker_instance = _as_drawn_by_worker(config, instance)
    worker_config.parallel.master_addr = store_host
    proc = ctx.Process(target=run_worker, name=f"pdlaunch-tp-rank-{rank}", daemon=True,
                       args=(rank, worker_config, worker_instance, device_type, dtype_name, max_model_len,
                             store_port, key, child_end))
    proc.start()
    child_end.close()
    return proc, parent_end


def _as_drawn_by_worker(config: DeploymentConfig, instance: InstanceSpec | None
                        ) -> tuple[DeploymentConfig, InstanceSpec | None]:
    """The worker's copy of the config with its own default engine_id, as a rank that parsed the
    config itself (e.g. on another node) would hold: only the sync makes it rank 0's (vLLM #39907)."""
    config = config.model_copy(deep=True)
    config.kv_transfer.engine_id = uuid.uuid4().hex
    if instance is not None:
        instance = instance.model_copy(update={"engine_id": f"{config.kv_transfer.engine_id}-{instance.name}"})
    return config, instance


def open_links(links: dict[int, Connection], remote: dict[int, str], setup: Setup) -> None:
    """Bound every rank link's sends (SEND_TIMEOUT_S), then send each remote rank its Setup, once (a local
    worker gets its settings as arguments)."""
    for conn in links.values():
        set_send_timeout(conn, SEND_TIMEOUT_S)
    for rank in remote:
        send(links[rank], setup)


def _rank_ended(ranks: TPRanks, rank: int, reason: str | None, wait_s: float = 0.0) -> RankEnded:
    """Rank `rank` failed during startup: its reason, how its process ended, where its log is."""
    ended = ranks.ended(rank, wait_s)
    if ended is None and rank in ranks.remote:
        ended = f"{ranks.where(rank)} closed its link to rank 0"
    ended = f"{ended or ranks.where(rank) + ' failed'} during startup"
    return RankEnded(f"{reason} ({ended})" if reason else ended, field="parallel.tp",
                     hint=f"see {ranks.log_of(rank)}")


def _startup_failure(ranks: TPRanks, links: dict[int, Connection]) -> RankEnded | None:
    """The failure of another rank that made this rank's startup fail: its RankFailed reason, or how
    its process ended; None when every rank is still up (this rank failed on its own)."""
    sentinels = [p.sentinel for p in ranks.procs.values()]
    if sentinels:  # a rank whose collective peer just failed learns it before that peer has exited
        wait(sentinels, timeout=DEATH_REPORT_WAIT_S)
    for rank, conn in sorted(links.items()):
        reason = ranks.drain_reason(rank, conn)
        if reason is not None or ranks.ended(rank) is not None or (rank in ranks.remote and is_closed(conn)):
            return _rank_ended(ranks, rank, reason)
    return None


def _watch_startup(ranks: TPRanks, links: dict[int, Connection], seconds: float) -> None:
    """Wait up to `seconds` for another rank to end before the group has formed (a local worker's process
    exits, a remote rank reports its failure or closes its link); then raise RankEnded naming it."""
    if wait([p.sentinel for p in ranks.procs.values()] + [links[r] for r in ranks.remote], timeout=seconds):
        raise _startup_failure(ranks, links) or RankEnded(
            "a TP rank sent rank 0 something else than its failure before the group formed", field="parallel.tp",
            hint="every rank of a TP group (on every node) must run the same pdlaunch version")


def wait_ready(ranks: TPRanks, rank: int) -> Ready:
    """Rank `rank`'s engine_id, side-channel port (or None) and advertised side-channel host."""
    conn = ranks.links[rank - 1]
    if not conn.poll(READY_WAIT_S):
        raise EngineError(f"{ranks.where(rank)} was not ready within {READY_WAIT_S:.0f}s",
                          field="parallel.tp", hint=f"see {ranks.log_of(rank)}")
    try:
        message = recv(conn, ranks.where(rank), "Ready")
    except MessageStalled as exc:  # the rank still runs: no "how it ended" to add
        raise RankEnded(str(exc), field="parallel.tp", hint=f"see {ranks.log_of(rank)}") from None
    except (EOFError, OSError):
        raise _rank_ended(ranks, rank, None, DEATH_REPORT_WAIT_S) from None
    match message:
        case Ready():
            return message
        case RankFailed(reason):  # it exits right after saying so
            raise _rank_ended(ranks, rank, reason, DEATH_REPORT_WAIT_S)
        case _:
            raise UnexpectedMessage(ranks.where(rank), message, "Ready")
