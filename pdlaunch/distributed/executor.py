"""Executors: how an engine runs its model, on one process (tp 1) or on a TP group (tp > 1).

`TPExecutor` lives in the engine process, which is TP rank 0: it hosts the rendezvous, spawns one
worker process per rank 1..T-1, schedules, hands every step's inputs to the workers over pipes
(the messages of messages.py), runs its own shard, and returns the logits it samples from. Rank 0
joins the group only once every other rank has come to the join (parallel_state.wait_for_joins),
watching them meanwhile: a rank that dies on its way (an import, its device, its checkpoint) is named
as it exits. A watchdog thread then follows the workers' process sentinels: a rank that dies fails the
next step (idle engines step every few seconds too) with an error naming the rank and the reason it
sent (RankFailed); a collective that a dead rank never joins fails with gloo at once and with NCCL at
COLLECTIVE_TIMEOUT_S.

A group spanning nodes (distributed/placement.py) spawns only this node's ranks; the others are
started by their node's launcher (remote_rank.py) and connect here over TCP (remote_link.py),
within RENDEZVOUS_TIMEOUT_S. The watchdog treats a closed connection as a dead rank.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import threading
import time
import uuid
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

import torch

from pdlaunch.config.models import DeploymentConfig, InstanceSpec, instance_cache
from pdlaunch.distributed.messages import (
    ConnectorCall,
    Execute,
    Message,
    MessageStalled,
    RankFailed,
    Ready,
    Setup,
    Shutdown,
    UnexpectedMessage,
    check_reply,
    recv,
    send,
)
from pdlaunch.distributed.parallel_state import RENDEZVOUS_TIMEOUT_S, create_store, destroy_tp_group, wait_for_joins
from pdlaunch.distributed.placement import RankPlacement, link_authkey
from pdlaunch.distributed.rank import build_rank
from pdlaunch.distributed.ray_executor import RayTPExecutor, rank_actors
from pdlaunch.distributed.remote_link import RankListener, is_closed, set_send_timeout
from pdlaunch.distributed.tp_connector import TPConnector
from pdlaunch.distributed.worker import run_worker
from pdlaunch.errors import EngineError
from pdlaunch.errors import exit_text as _exit_text
from pdlaunch.kv_transfer.base import KVConnector
from pdlaunch.model.loader import Checkpoint
from pdlaunch.runner.model_runner import ModelRunner
from pdlaunch.runner.step_inputs import StepInputs

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0  # a worker that does not exit after "shutdown" within this is killed
REPLY_TIMEOUT_S = 30.0  # a rank that does not answer a connector call within this is failed
# A step's inputs can outgrow the socket buffers (~400 KiB): a rank that takes nothing of a message
# within this is failed (hung or stopped); "shutdown" is tiny and gets the short bound.
SEND_TIMEOUT_S = 60.0
SHUTDOWN_SEND_TIMEOUT_S = 1.0
DEATH_REPORT_WAIT_S = 2.0  # after a failed collective, how long to wait for the watchdog to name the rank
# A rank that ended sent its reason (RankFailed) whole before it went: reading what is left on its link takes
# milliseconds. This bounds that read (and the wait for the link's lock) when the peer stopped mid-message,
# so the reader does not hold the link, and the engine thread waiting for it, for MESSAGE_STALL_S.
REASON_READ_S = 2.0
LINK_BUSY_WAIT_S = 2 * REASON_READ_S + 1.0  # the longest the engine thread waits for a link the watchdog reads


class RankEnded(EngineError):
    """Another rank's failure while the group started, already named (its reason, how it ended, its log)."""


class UniprocExecutor:
    """tp 1: the model runs in the engine process."""

    def __init__(self, runner: ModelRunner, engine_id: str) -> None:
        self.runner = runner
        self.engine_id = engine_id

    def execute(self, inputs: StepInputs) -> torch.Tensor:
        return self.runner.run(inputs)

    def check_health(self) -> None:
        """Nothing to watch in one process."""

    def wrap_connector(self, connector: KVConnector) -> KVConnector:
        return connector

    def rank_engine_ids(self) -> list[str]:
        return [self.engine_id]

    def rank_nodes(self) -> list[str]:
        """Node address of each rank when the executor knows it (under Ray); else [] (/info: the instance's host)."""
        return []

    def shutdown(self) -> None:
        self.runner.release()


def open_links(links: dict[int, Connection], remote: dict[int, str], setup: Setup) -> None:
    """Bound every rank link's sends (SEND_TIMEOUT_S), then send each remote rank its Setup, once (a local
    worker gets its settings as arguments)."""
    for conn in links.values():
        set_send_timeout(conn, SEND_TIMEOUT_S)
    for rank in remote:
        send(links[rank], setup)


class TPExecutor:
    """tp > 1: this process is rank 0 of the instance's TP group."""

    def __init__(self, config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
                 device: torch.device, dtype: torch.dtype, max_model_len: int, dtype_name: str) -> None:
        self.tp_size = instance.tp if instance is not None else config.parallel.tp
        self.failure: str | None = None
        self._name = instance.name if instance is not None else "engine"  # as the workers' log lines say
        # rank -> lock held while reading its link: the engine thread (_mirror) and the watchdog both read them
        self._recv_locks: dict[int, threading.Lock] = {r: threading.Lock() for r in range(1, self.tp_size)}
        self._closing = threading.Event()
        self._procs: dict[int, BaseProcess] = {}  # local ranks (spawned here)
        self._remote: dict[int, str] = {}  # ranks on other nodes -> "node K (address)"
        self._conns: list[Connection] = []  # ranks 1..T-1 in order: pipes, or TCP links for remote ranks
        placement = RankPlacement.from_env()
        self._hosts = list(placement.hosts) if placement is not None else []
        port = instance.master_port if instance is not None else config.parallel.master_port
        self._store = create_store(config.parallel.master_addr, port, self.tp_size)
        ctx = mp.get_context("spawn")
        listener: RankListener | None = None
        links: dict[int, Connection] = {}
        try:
            if placement is not None and instance is not None:
                self._remote = {r: f"node {placement.nodes[r]} ({placement.hosts[r]})"
                                for r in placement.remote_ranks()}
                listener = RankListener(placement.hosts[0], link_authkey(config, instance.name, self._store.port))
                listener.publish(self._store)
            for rank in range(1, self.tp_size):
                if rank in self._remote:
                    continue
                parent_end, child_end = ctx.Pipe(duplex=True)
                worker_config, worker_instance = _as_drawn_by_worker(config, instance)
                proc = ctx.Process(target=run_worker, name=f"pdlaunch-tp-rank-{rank}", daemon=True,
                                   args=(rank, worker_config, worker_instance, device.type, dtype_name,
                                         max_model_len, self._store.port, child_end))
                proc.start()
                child_end.close()
                self._procs[rank] = proc
                links[rank] = parent_end
            if listener is not None:
                links.update(listener.accept(self._remote, RENDEZVOUS_TIMEOUT_S))
            open_links(links, self._remote, Setup(device.type, dtype_name, max_model_len))
            self._conns = [links[r] for r in range(1, self.tp_size)]
            wait_for_joins(self._store, self.tp_size, RENDEZVOUS_TIMEOUT_S, lambda s: self._watch_startup(links, s))
            state = build_rank(0, config, instance, checkpoint, device, dtype, max_model_len, self._store.port,
                               self._store)
            self.runner = state.runner
            self.engine_id = state.engine_id
            ready = [self._wait_ready(r) for r in range(1, self.tp_size)]
            self._rank_engine_ids = [self.engine_id] + [r.engine_id for r in ready]
            self._side_ports: list[int | None] = [None, *(r.side_channel_port for r in ready)]
            self._side_hosts: list[str | None] = [None, *(r.side_channel_host for r in ready)]
        except BaseException as exc:
            self._conns = [links[r] for r in sorted(links)]
            # Rank 0's own error (a join or collective that timed out) hides why: the rank that failed.
            named = isinstance(exc, RankEnded) or not isinstance(exc, Exception)
            failed = None if named else self._startup_failure(links)
            self._stop_workers()
            destroy_tp_group()
            if failed is not None:
                raise failed from exc
            raise
        finally:
            if listener is not None:
                listener.close()
        self._watchdog = threading.Thread(target=self._watch, name="pdlaunch-tp-watchdog", daemon=True)
        self._watchdog.start()
        log.info("TP group of %d ranks ready (local worker pids %s, ranks on other nodes: %s)", self.tp_size,
                 [p.pid for p in self._procs.values()], self._remote or "none")

    # -- startup ---------------------------------------------------------------------------------
    def _where(self, rank: int) -> str:
        proc = self._procs.get(rank)
        return f"TP rank {rank} (pid {proc.pid})" if proc is not None else f"TP rank {rank} on {self._remote[rank]}"

    def _log_of(self, rank: int) -> str:
        """Where rank `rank`'s output is: a local worker writes to this process's stderr (the instance's log
        under the launcher), a remote rank to its own log on its node."""
        if rank in self._remote:
            return f"its log on {self._remote[rank]}: {self._name}-rank{rank}.log in that node's log_dir"
        try:
            own = os.readlink("/proc/self/fd/2")
        except OSError:
            own = ""
        where = own if os.path.isfile(own) else "this process's stderr"
        return f"its lines ('{self._name} rank {rank}') in {where}"

    def _ended(self, rank: int, wait_s: float = 0.0) -> str | None:
        """How rank `rank`'s local process ended (waiting up to `wait_s` for it), or None: it runs or is remote."""
        proc = self._procs.get(rank)
        if proc is None or not wait([proc.sentinel], timeout=wait_s):
            return None
        # The sentinel closes as the process exits, a moment before it can be reaped: a timed join waits for that.
        proc.join(DEATH_REPORT_WAIT_S)
        return f"{self._where(rank)} {_exit_text(proc.exitcode)}" if proc.exitcode is not None else None

    def _drain_reason(self, rank: int, conn: Connection) -> str | None:
        """The reason rank `rank` sent before it ended (RankFailed), from what is left on its link. No message is
        begun after REASON_READ_S and each may stall that long at most (2 x REASON_READ_S in all); a peer that
        stopped mid-message gives that as the reason."""
        lock = self._recv_locks[rank]
        if not lock.acquire(timeout=REASON_READ_S):
            log.warning("%s: its link stayed busy (the engine thread reading a reply) for %.0fs; its failure is "
                        "reported without the reason it may have sent", self._where(rank), REASON_READ_S)
            return None
        reason: str | None = None
        deadline = time.monotonic() + REASON_READ_S
        try:
            while conn.poll(0) and time.monotonic() < deadline:
                message = recv(conn, self._where(rank), stall_s=REASON_READ_S)
                if isinstance(message, RankFailed):
                    reason = message.message
        except (MessageStalled, UnexpectedMessage) as exc:
            reason = reason or str(exc)
        except (EOFError, OSError):
            pass
        finally:
            lock.release()
        return reason

    def _rank_ended(self, rank: int, reason: str | None, wait_s: float = 0.0) -> RankEnded:
        """Rank `rank` failed during startup: its reason, how its process ended, where its log is."""
        ended = self._ended(rank, wait_s)
        if ended is None and rank in self._remote:
            ended = f"{self._where(rank)} closed its link to rank 0"
        ended = f"{ended or self._where(rank) + ' failed'} during startup"
        return RankEnded(f"{reason} ({ended})" if reason else ended, field="parallel.tp",
                         hint=f"see {self._log_of(rank)}")

    def _startup_failure(self, links: dict[int, Connection]) -> RankEnded | None:
        """The failure of another rank that made this rank's startup fail: its RankFailed reason, or how
        its process ended; None when every rank is still up (this rank failed on its own)."""
        sentinels = [p.sentinel for p in self._procs.values()]
        if sentinels:  # a rank whose collective peer just failed learns it before that peer has exited
            wait(sentinels, timeout=DEATH_REPORT_WAIT_S)
        for rank, conn in sorted(links.items()):
            reason = self._drain_reason(rank, conn)
            if reason is not None or self._ended(rank) is not None or (rank in self._remote and is_closed(conn)):
                return self._rank_ended(rank, reason)
        return None

    def _watch_startup(self, links: dict[int, Connection], seconds: float) -> None:
        """Wait up to `seconds` for another rank to end before the group has formed (a local worker's process
        exits, a remote rank reports its failure or closes its link); then raise RankEnded naming it."""
        if wait([p.sentinel for p in self._procs.values()] + [links[r] for r in self._remote], timeout=seconds):
            raise self._startup_failure(links) or RankEnded(
                "a TP rank sent rank 0 something else than its failure before the group formed", field="parallel.tp",
                hint="every rank of a TP group (on every node) must run the same pdlaunch version")

    def _wait_ready(self, rank: int) -> Ready:
        """Rank `rank`'s engine_id, side-channel port (or None) and advertised side-channel host."""
        conn = self._conns[rank - 1]
        if not conn.poll(RENDEZVOUS_TIMEOUT_S):
            raise EngineError(f"{self._where(rank)} was not ready within {RENDEZVOUS_TIMEOUT_S:.0f}s",
                              field="parallel.tp", hint=f"see {self._log_of(rank)}")
        try:
            message = recv(conn, self._where(rank), "Ready")
        except MessageStalled as exc:  # the rank still runs: no "how it ended" to add
            raise RankEnded(str(exc), field="parallel.tp", hint=f"see {self._log_of(rank)}") from None
        except (EOFError, OSError):
            raise self._rank_ended(rank, None, DEATH_REPORT_WAIT_S) from None
        match message:
            case Ready():
                return message
            case RankFailed(reason):  # it exits right after saying so
                raise self._rank_ended(rank, reason, DEATH_REPORT_WAIT_S)
            case _:
                raise UnexpectedMessage(self._where(rank), message, "Ready")

    # -- steps -----------------------------------------------------------------------------------
    def execute(self, inputs: StepInputs) -> torch.Tensor:
        self.check_health()
        self._send_all(Execute(inputs))
        try:
            return self.runner.run(inputs)
        except RuntimeError as exc:
            raise self._rank_failure(exc) from exc

    def _send_all(self, message: Message) -> None:
        for rank, conn in enumerate(self._conns, start=1):
            try:
                send(conn, message)
            except BlockingIOError as exc:
                stuck = TimeoutError(f"it took none of {type(message).__name__} within {SEND_TIMEOUT_S:.0f}s "
                                     "(hung or stopped)")
                raise self._rank_failure(stuck, rank) from exc
            except OSError as exc:
                raise self._rank_failure(exc, rank) from exc

    def _rank_failure(self, exc: BaseException, rank: int | None = None) -> EngineError:
        deadline = time.monotonic() + DEATH_REPORT_WAIT_S
        while self.failure is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if isinstance(exc, MessageStalled):  # it names the rank already
            message = self.failure or str(exc)
        else:
            message = self.failure or (f"{self._where(rank)} is unreachable: {exc}" if rank is not None
                                       else f"a TP collective failed: {exc}{self._stopped_ranks()}")
        self.failure = message
        return EngineError(message, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def _stopped_ranks(self) -> str:
        """Which local ranks are stopped (a collective timing out names no peer; a dead one the watchdog names)."""
        stopped = [self._where(rank) for rank, proc in self._procs.items() if _is_stopped(proc.pid)]
        return f" ({', '.join(stopped)} stopped: SIGSTOP or a debugger)" if stopped else ""

    def wrap_connector(self, connector: KVConnector) -> KVConnector:
        """Rank 0's connector, with every scheduler-side call mirrored to the other ranks' connectors."""
        return TPConnector(connector, self.tp_size, self._mirror, self._side_ports, self._side_hosts)

    def _mirror(self, call: ConnectorCall) -> list[object]:
        """Make `call` on the connector of every rank > 0 (in step order); their replies if it has any."""
        self.check_health()
        self._send_all(call)
        if call.reply_type is None:
            return []
        replies: list[object] = []
        for rank, conn in enumerate(self._conns, start=1):
            if not conn.poll(REPLY_TIMEOUT_S):
                raise self._rank_failure(TimeoutError(
                    f"no answer to {type(call).__name__} within {REPLY_TIMEOUT_S:.0f}s"), rank)
            try:
                message = self._read_reply(rank, conn, call)
            except (EOFError, OSError) as exc:  # raised with the link's lock released: the watchdog may name it
                raise self._rank_failure(exc, rank) from exc
            if isinstance(message, RankFailed):  # the rank exits right after: the instance cannot serve on
                self.failure = self.failure or message.message
                raise EngineError(message.message, field="parallel.tp", hint=f"see {self._log_of(rank)}; the "
                                  "instance must restart")
            try:
                replies.append(check_reply(call, message, self._where(rank)))
            except UnexpectedMessage as exc:  # the later ranks' replies stay unread: their links are out of step
                self.failure = self.failure or exc.message
                raise
        return replies

    def _read_reply(self, rank: int, conn: Connection, call: ConnectorCall) -> Message:
        """Rank `rank`'s answer to `call`, which poll said is arriving. The watchdog reads a link too (why its
        rank ended, for 2 x REASON_READ_S at most): a longer wait for the link fails the rank saying so, and a
        reply the watchdog took went with its rank (EOFError)."""
        lock = self._recv_locks[rank]
        if not lock.acquire(timeout=LINK_BUSY_WAIT_S):
            raise TimeoutError(f"its link stayed busy (the watchdog reading why the rank ended) for "
                               f"{LINK_BUSY_WAIT_S:.0f}s while the reply to {type(call).__name__} waited")
        try:
            if not conn.poll(0):
                raise EOFError(f"the watchdog took what it sent for the reply to {type(call).__name__}: it ended")
            return recv(conn, self._where(rank), f"the reply to {type(call).__name__}")
        finally:
            lock.release()

    def check_health(self) -> None:
        """Raise EngineError naming the rank if a worker died."""
        if self.failure is not None:
            raise EngineError(self.failure, field="parallel.tp", hint="see that rank's log; the instance must restart")

    def rank_engine_ids(self) -> list[str]:
        """engine_id as each rank holds it, in rank order."""
        return list(self._rank_engine_ids)

    def rank_nodes(self) -> list[str]:
        """The configured node address of each rank when the group spans nodes; else [] (/info: the host)."""
        return list(self._hosts)

    # -- watchdog and shutdown -------------------------------------------------------------------
    def _watch(self) -> None:
        sentinels = {p.sentinel: rank for rank, p in self._procs.items()}
        remote = dict(self._remote)
        links = dict(enumerate(self._conns, start=1))  # shutdown empties self._conns under this thread
        while not self._closing.is_set() and (sentinels or remote):
            # wait() hands back some of the objects it was given: here process sentinels, ints.
            ended = [s for s in wait(list(sentinels), timeout=0.5) if isinstance(s, int)] if sentinels else []
            if not sentinels:
                self._closing.wait(0.5)
            for sentinel in ended:
                rank = sentinels.pop(sentinel)
                if self._closing.is_set():
                    return
                self._report_dead(rank, links[rank], self._ended(rank) or f"{self._where(rank)} exited")
            for rank in [r for r in remote if is_closed(links[r])]:
                if self._closing.is_set():
                    return
                remote.pop(rank)
                self._report_dead(rank, links[rank], f"{self._where(rank)} closed its connection (the rank, its "
                                  "node's launcher or the node is gone)")

    def _report_dead(self, rank: int, conn: Connection, ended: str) -> None:
        """Fail the instance for rank `rank`, which `ended`: with the reason it sent on `conn`, if it sent one."""
        reason = self._drain_reason(rank, conn)
        message = f"{reason} ({ended})" if reason else ended
        self.failure = self.failure or message  # the first failure is the cause (a RankFailed _mirror read)
        log.error("%s: the instance cannot serve without it", message)

    def _stop_workers(self) -> None:
        self._closing.set()
        for conn in self._conns:
            try:
                set_send_timeout(conn, SHUTDOWN_SEND_TIMEOUT_S)
                send(conn, Shutdown())
            except OSError:  # that rank is gone already, or hung with its buffer full: it is killed below
                pass
        for rank, proc in self._procs.items():
            proc.join(JOIN_TIMEOUT_S)
            if proc.is_alive():  # a worker ignores SIGTERM (worker.py): killed, not terminated
                log.warning("TP rank %d (pid %s) did not exit within %.0fs: killing it", rank, proc.pid,
                            JOIN_TIMEOUT_S)
                proc.kill()
                proc.join(JOIN_TIMEOUT_S)
                if proc.is_alive():  # SIGKILL waits for it to leave the kernel: it is stuck there
                    log.error("TP rank %d (pid %s) did not exit within %gs of SIGKILL: it is stuck in an "
                              "uninterruptible call (a hung device driver or file system) and is left behind; check "
                              "the device (nvidia-smi) and dmesg", rank, proc.pid, JOIN_TIMEOUT_S)
        for conn in self._conns:
            conn.close()  # a remote rank leaves the group on "shutdown"; its own node's launcher reaps it

    def shutdown(self) -> None:
        """Stop and reap every worker, leave the group, free this rank's memory. Idempotent."""
        if self._closing.is_set() and not self._conns:
            return
        self._stop_workers()
        self._procs = {}
        self._conns = []
        destroy_tp_group()
        self.runner.release()


def _is_stopped(pid: int | None) -> bool:
    """True when process `pid` is stopped by a signal or traced (Linux /proc; False elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] in ("T", "t")
    except (OSError, IndexError):
        return False


def _as_drawn_by_worker(config: DeploymentConfig, instance: InstanceSpec | None
                        ) -> tuple[DeploymentConfig, InstanceSpec | None]:
    """The worker's copy of the config with its own default engine_id, as a rank that parsed the
    config itself (e.g. on another node) would hold: only the sync makes it rank 0's (vLLM #39907)."""
    config = config.model_copy(deep=True)
    config.kv_transfer.engine_id = uuid.uuid4().hex
    if instance is not None:
        instance = instance.model_copy(update={"engine_id": f"{config.kv_transfer.engine_id}-{instance.name}"})
    return config, instance


def create_executor(config: DeploymentConfig, instance: InstanceSpec | None, checkpoint: Checkpoint,
                    device: torch.device, dtype: torch.dtype, max_model_len: int,
                    engine_id: str) -> UniprocExecutor | TPExecutor | RayTPExecutor:
    """The executor for the instance's TP size."""
    tp = instance.tp if instance is not None else config.parallel.tp
    if tp == 1:
        graphs = device.type == "cuda" and not config.model.enforce_eager
        # Prefill instances never run a decode batch: no decode graphs to capture there.
        decode_graphs = graphs and (instance is None or instance.role != "prefill")
        runner = ModelRunner(checkpoint, device, dtype, instance_cache(config, instance), config.scheduler,
                             max_model_len, use_cumem=config.model.enable_cumem_allocator,
                             decode_graphs=decode_graphs, mixed_graphs=graphs,
                             role=instance.role if instance is not None else "colocated")
        return UniprocExecutor(runner, engine_id)
    if config.model.enable_sleep_mode:
        raise EngineError(f"sleep mode is not supported with TP {tp} yet", field="model.enable_sleep_mode",
                          hint="run sleep mode with --tp 1")
    if instance is not None and instance.role != "colocated" and config.kv_transfer.connector == "storage":
        raise EngineError(f"the {config.kv_transfer.connector} connector does not run with TP {tp} yet",
                          field="kv_transfer.connector", hint="use --kv-connector nixl or mooncake with TP > 1")
    actors = rank_actors()
    if actors and instance is not None:  # this process is rank 0 of an instance under --backend ray
        return RayTPExecutor(config, instance, checkpoint, device, dtype, max_model_len, config.model.dtype, actors)
    return TPExecutor(config, instance, checkpoint, device, dtype, max_model_len, config.model.dtype)
