"""A TP worker process (ranks 1..T-1): builds its shard, then runs whatever rank 0 hands it.

Rank 0 talks to it over a pipe with the messages of messages.py: steps to forward (logits are rank
0's business), connector calls to mirror on this rank's own connector, shutdown. The worker answers
Ready once built, Reply when a call wants an answer, RankFailed before dying. It exits when rank 0
is gone (pipe closed or parent changed) instead of hanging.
Ranks on other nodes (remote_rank.py) run the same `serve_rank` over a TCP connection.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Mapping
from multiprocessing.connection import Connection

import torch

from pdlaunch.config.deployment_config import DeploymentConfig, InstanceSpec
from pdlaunch.distributed.link_socket import link_timed_out, peer_address
from pdlaunch.distributed.message_stream import UnexpectedMessage, recv, send
from pdlaunch.distributed.messages import (
    AbortLoad,
    Execute,
    ForgetEngine,
    GetFinished,
    RankFailed,
    Ready,
    ReleaseHeld,
    ReleaseUnloaded,
    Reply,
    RequestFinished,
    Shutdown,
    StartLoad,
)
from pdlaunch.distributed.parallel_state import SealedStore, destroy_tp_group
from pdlaunch.distributed.rank import RankState, build_rank, kv_cache_spec, rank_device
from pdlaunch.distributed.tp_connector import rank_connector_call
from pdlaunch.errors import PdlaunchError
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.memory.heap import freeze_startup_heap, thaw_heap
from pdlaunch.memory.platform import set_device
from pdlaunch.model.checkpoint import load_checkpoint, resolve_dtype
from pdlaunch.runner.model_runner import ModelRunner

log = logging.getLogger(__name__)

PARENT_POLL_S = 1.0  # how often an idle worker checks that rank 0 is still alive
EXPECTED_FROM_RANK0 = "a step, a connector call or shutdown"


def run_worker(rank: int, config: DeploymentConfig, instance: InstanceSpec | None, device_type: str,
               dtype_name: str, max_model_len: int, master_port: int, store_key: bytes, conn: Connection) -> None:
    """Process entry point (multiprocessing spawn target) of TP rank `rank`; `store_key` seals rank 0's store
    (spawn hands it over a pipe, not the command line)."""
    name = instance.name if instance is not None else "engine"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s %(levelname)s {name} rank {rank} %(name)s: %(message)s")
    # Rank 0 stops this rank (a message, or the pipe closing when it dies). The launcher signals the
    # whole process group on Ctrl-C; dying on that signal first would make rank 0 report a dead rank
    # while it shuts down cleanly. SIGKILL (the launcher's last resort) still ends it.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    serve_rank(rank, config, instance, device_type, dtype_name, max_model_len, master_port, conn, os.getppid(),
               key=store_key)


def serve_rank(rank: int, config: DeploymentConfig, instance: InstanceSpec | None, device_type: str,
               dtype_name: str, max_model_len: int, master_port: int, conn: Connection, parent: int,
               store: SealedStore | None = None, key: bytes | None = None) -> None:
    """Build rank `rank` (joining the group through `store`, or a client of rank 0's sealed with `key`: see
    rank.build_rank), report ready, serve rank 0's messages until it says shutdown or is gone (`parent` is the
    process whose end ends this rank)."""
    tp = instance.tp if instance is not None else config.parallel.tp
    rank0 = f"rank 0 of {instance.name if instance is not None else 'the engine'}"
    link = peer_address(conn)  # a TCP link's (a rank on another node), read while it is connected
    state: RankState | None = None
    connector: KVConnector | None = None
    try:
        state, connector, ready = build_worker_rank(rank, config, instance, device_type, dtype_name, max_model_len,
                                                    master_port, store, key)
        send(conn, ready)
        freeze_startup_heap()  # as rank 0's engine does (memory/heap.py)
        _serve(rank, tp, state.runner, connector, conn, parent)
    except Exception as exc:  # noqa: BLE001 - reported to rank 0, then this rank exits non-zero
        lost = link_timed_out(exc, rank0, link) if link is not None else None
        if lost is not None:  # no one to report it to
            log.error("TP rank %d: %s", rank, lost)
            sys.exit(1)
        # A PdlaunchError is a user-facing problem: its message says it all (the launcher shows this log's last
        # lines), no traceback.
        log.error("TP rank %d failed: %s%s", rank, exc,
                  "" if isinstance(exc, PdlaunchError) else "\n" + traceback.format_exc())
        try:
            send(conn, RankFailed(f"TP rank {rank} failed: {failure_text(exc)}"))
        except OSError:
            pass
        sys.exit(1)
    finally:
        thaw_heap()
        if connector is not None:
            connector.shutdown()
        if state is not None:
            state.runner.release()
        destroy_tp_group()


def failure_text(exc: BaseException) -> str:
    """`exc` in one line for rank 0's error: ours as written for the user; another with its type and the line that
    raised it (its text alone may be empty: a bare assert, MemoryError; the traceback stays in this rank's log)."""
    if isinstance(exc, PdlaunchError):
        return str(exc)
    text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    frames = traceback.extract_tb(exc.__traceback__)
    if not frames:
        return text
    return f"{text} (raised at {os.path.basename(frames[-1].filename)}:{frames[-1].lineno} in {frames[-1].name})"


def rank_threads(tp: int, environ: Mapping[str, str]) -> int | None:
    """The intra-op threads of a TP rank > 0: its share of the cores (the group's ranks run side by side), or None
    when OMP_NUM_THREADS is set (torch read it at import): the launcher's share per instance (child_commands.py), a
    Kubernetes pod's cores (render/pod_resources.py) or the user's own. Overriding it gave a rank pod requesting 2
    cores one thread per core of its whole node."""
    if "OMP_NUM_THREADS" in environ:
        return None
    return max(1, (os.cpu_count() or 1) // tp)


def build_worker_rank(rank: int, config: DeploymentConfig, instance: InstanceSpec | None, device_type: str,
                      dtype_name: str, max_model_len: int, master_port: int, store: SealedStore | None = None,
                      key: bytes | None = None) -> tuple[RankState, KVConnector | None, Ready]:
    """Rank `rank` (> 0) built: its shard joined to the group, its own connector (PD roles), and the
    Ready it reports to rank 0. A Ray rank actor (ray_rank.py) builds itself the same way."""
    tp = instance.tp if instance is not None else config.parallel.tp
    threads = rank_threads(tp, os.environ)
    if threads is not None:
        torch.set_num_threads(threads)
    device = rank_device(device_type, instance, rank)
    if device.type == "cuda":
        set_device(device.index or 0)
    checkpoint = load_checkpoint(config.model.path, config.model.quantization)
    dtype = resolve_dtype(dtype_name, device)
    state = build_rank(rank, config, instance, checkpoint, device, dtype, max_model_len, master_port, store, key)
    connector: KVConnector | None = None
    try:
        if instance is not None and instance.role in ("prefill", "decode") and not config.colocated:
            from pdlaunch.kv_transfer.factory import create_connector

            connector = create_connector(config, instance)  # after the engine_id sync (vLLM #39907)
            if connector is not None:
                connector.register_kv_caches(kv_cache_spec(checkpoint, state.runner))
    except BaseException:
        state.runner.release()
        destroy_tp_group()
        raise
    server = getattr(connector, "server", None)
    side = connector.side_channel_address if server is not None else (None, None)  # type: ignore[union-attr]
    return state, connector, Ready(state.engine_id, side[1], side[0])


def _serve(rank: int, tp: int, runner: ModelRunner, connector: KVConnector | None, conn: Connection,
           parent: int) -> None:
    while True:
        if not conn.poll(PARENT_POLL_S):
            if os.getppid() != parent:
                log.error("TP rank %d: rank 0 (pid %d) is gone, exiting", rank, parent)
                return
            continue
        try:
            message = recv(conn, "rank 0", EXPECTED_FROM_RANK0)
        except EOFError:
            log.error("TP rank %d: rank 0 closed the pipe, exiting", rank)
            return
        match message:
            case Execute(inputs):
                runner.run(inputs)
            case StartLoad() | RequestFinished() | GetFinished() | AbortLoad() | ReleaseUnloaded() | ReleaseHeld() \
                    | ForgetEngine():
                if connector is None:
                    raise RuntimeError(f"rank 0 mirrored {type(message).__name__} but TP rank {rank} has no connector")
                result = rank_connector_call(connector, rank, tp, message)
                if message.reply_type is not None:
                    send(conn, Reply(result))
            case Shutdown():
                log.info("TP rank %d shutting down", rank)
                return
            case _:
                raise UnexpectedMessage("rank 0", message, EXPECTED_FROM_RANK0)
