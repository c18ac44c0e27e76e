"""Ranks 1..T-1 as TP rank 0 holds them: a local worker's process, a remote rank's node, a link to each.

Two of rank 0's threads read a link: the engine thread (a connector call's reply, tp_executor.py) and the
watchdog (why a rank ended, tp_watchdog.py). Each link has a lock for that, and each reader a bound on its
wait for it. This is also where a rank is named in errors (which process, which node, where its log is),
and where the ranks are stopped.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess

from pdlaunch.distributed.link_socket import set_send_timeout
from pdlaunch.distributed.message_stream import MessageStalled, UnexpectedMessage, recv, send
from pdlaunch.distributed.messages import ConnectorCall, Message, RankFailed, Shutdown
from pdlaunch.errors import exit_text as _exit_text

log = logging.getLogger(__name__)

JOIN_TIMEOUT_S = 10.0  # a worker that does not exit after "shutdown" within this is killed
SHUTDOWN_SEND_TIMEOUT_S = 1.0  # "shutdown" is tiny: a rank that takes none of it within this is hung
DEATH_REPORT_WAIT_S = 2.0  # after a failed collective, how long to wait for the watchdog to name the rank
# A rank that ended sent its reason (RankFailed) whole before it went: reading what is left on its link takes
# milliseconds. This bounds that read (and the wait for the link's lock) when the peer stopped mid-message,
# so the reader does not hold the link, and the engine thread waiting for it, for MESSAGE_STALL_S.
REASON_READ_S = 2.0
LINK_BUSY_WAIT_S = 2 * REASON_READ_S + 1.0  # the longest the engine thread waits for a link the watchdog reads


class TPRanks:
    """Ranks 1..T-1 of one instance's TP group, as its rank 0 started them or accepted their links."""

    def __init__(self, name: str, tp_size: int, in_pods: bool = False) -> None:
        self.name = name  # the instance's, as the workers' log lines say
        # Kubernetes: `name` is the leader pod's, and remote rank r runs in the worker pod `<name>-<r>` (LWS's naming)
        self.in_pods = in_pods
        # rank -> lock held while reading its link: the engine thread (read_reply) and the watchdog both read them
        self.recv_locks: dict[int, threading.Lock] = {r: threading.Lock() for r in range(1, tp_size)}
        self.closing = threading.Event()
        self.procs: dict[int, BaseProcess] = {}  # local ranks (spawned here)
        self.remote: dict[int, str] = {}  # ranks on other nodes -> "node K (address)"
        self.links: list[Connection] = []  # ranks 1..T-1 in order: pipes, or TCP links for remote ranks

    def where(self, rank: int) -> str:
        proc = self.procs.get(rank)
        return f"TP rank {rank} (pid {proc.pid})" if proc is not None else f"TP rank {rank} on {self.remote[rank]}"

    def log_of(self, rank: int) -> str:
        """Where rank `rank`'s output is: a local worker writes to this process's stderr (the instance's log
        under the launcher), a remote rank to its own log on its node, or its worker pod's output."""
        if rank in self.remote and self.in_pods:
            return f"its pod's output (`kubectl logs {self.name}-{rank}`)"
        if rank in self.remote:
            return f"its log on {self.remote[rank]}: {self.name}-rank{rank}.log in that node's log_dir"
        try:
            own = os.readlink("/proc/self/fd/2")
        except OSError:
            own = ""
        where = own if os.path.isfile(own) else "this process's stderr"
        return f"its lines ('{self.name} rank {rank}') in {where}"

    def ended(self, rank: int, wait_s: float = 0.0) -> str | None:
        """How rank `rank`'s local process ended (waiting up to `wait_s` for it), or None: it runs or is remote."""
        proc = self.procs.get(rank)
        if proc is None or not wait([proc.sentinel], timeout=wait_s):
            return None
        # The sentinel closes as the process exits, a moment before it can be reaped: a timed join waits for that.
        proc.join(DEATH_REPORT_WAIT_S)
        return f"{self.where(rank)} {_exit_text(proc.exitcode)}" if proc.exitcode is not None else None

    def stopped(self) -> str:
        """Which local ranks are stopped (a collective timing out names no peer; a dead one the watchdog names)."""
        stopped = [self.where(rank) for rank, proc in self.procs.items() if _is_stopped(proc.pid)]
        return f" ({', '.join(stopped)} stopped: SIGSTOP or a debugger)" if stopped else ""

    def drain_reason(self, rank: int, conn: Connection) -> str | None:
        """The reason rank `rank` sent before it ended (RankFailed), from what is left on its link. No message is
        begun after REASON_READ_S and each may stall that long at most (2 x REASON_READ_S in all); a peer that
        stopped mid-message gives that as the reason."""
        lock = self.recv_locks[rank]
        if not lock.acquire(timeout=REASON_READ_S):
            log.warning("%s: its link stayed busy (the engine thread reading a reply) for %.0fs; its failure is "
                        "reported without the reason it may have sent", self.where(rank), REASON_READ_S)
            return None
        reason: str | None = None
        deadline = time.monotonic() + REASON_READ_S
        try:
            while conn.poll(0) and time.monotonic() < deadline:
                message = recv(conn, self.where(rank), stall_s=REASON_READ_S)
                if isinstance(message, RankFailed):
                    reason = message.message
        except (MessageStalled, UnexpectedMessage) as exc:
            reason = reason or str(exc)
        except (EOFError, OSError):
            pass
        finally:
            lock.release()
        return reason

    def read_reply(self, rank: int, conn: Connection, call: ConnectorCall) -> Message:
        """Rank `rank`'s answer to `call`, which poll said is arriving. The watchdog reads a link too (why its
        rank ended, for 2 x REASON_READ_S at most): a longer wait for the link fails the rank saying so, and a
        reply the watchdog took went with its rank (EOFError)."""
        lock = self.recv_locks[rank]
        if not lock.acquire(timeout=LINK_BUSY_WAIT_S):
            raise TimeoutError(f"its link stayed busy (the watchdog reading why the rank ended) for "
                               f"{LINK_BUSY_WAIT_S:.0f}s while the reply to {type(call).__name__} waited")
        try:
            if not conn.poll(0):
                raise EOFError(f"the watchdog took what it sent for the reply to {type(call).__name__}: it ended")
            return recv(conn, self.where(rank), f"the reply to {type(call).__name__}")
        finally:
            lock.release()

    def stop(self) -> None:
        """Tell every rank to shut down, reap the local ones (all within one JOIN_TIMEOUT_S; then those still there,
        and at once those stopped by SIGSTOP or a debugger, are killed together and reaped), close every link."""
        self.closing.set()
        for conn in self.links:
            try:
                set_send_timeout(conn, SHUTDOWN_SEND_TIMEOUT_S)
                send(conn, Shutdown())
            except OSError:  # that rank is gone already, or hung with its buffer full: it is killed below
                pass
        # One deadline for all of them, then one kill of all that are left: a worker at a time (JOIN_TIMEOUT_S
        # each, in turn) made a TP 8 instance whose workers could not read "shutdown" (still loading, or blocked in
        # a collective on a dead peer) take 70 s to stop.
        stopped = {rank for rank, proc in self.procs.items() if _is_stopped(proc.pid)}  # cannot act on "shutdown"
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for rank, proc in self.procs.items():
            if rank not in stopped:
                proc.join(max(0.0, deadline - time.monotonic()))
        left = {rank: proc for rank, proc in self.procs.items() if proc.is_alive()}
        for rank, proc in left.items():  # a worker ignores SIGTERM (worker.py): killed, not terminated
            if rank in stopped:
                log.warning("%s is stopped (SIGSTOP or a debugger): killing it", self.where(rank))
            else:
                log.warning("TP rank %d (pid %s) did not exit within %.0fs: killing it", rank, proc.pid,
                            JOIN_TIMEOUT_S)
            proc.kill()
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        for rank, proc in left.items():
            proc.join(max(0.0, deadline - time.monotonic()))
            if proc.is_alive():  # SIGKILL waits for it to leave the kernel: it is stuck there
                log.error("TP rank %d (pid %s) did not exit within %gs of SIGKILL: it is stuck in an "
                          "uninterruptible call (a hung device driver or file system) and is left behind; check "
                          "the device (nvidia-smi) and dmesg", rank, proc.pid, JOIN_TIMEOUT_S)
        for conn in self.links:
            conn.close()  # a remote rank leaves the group on "shutdown"; its own node's launcher reaps it


def _is_stopped(pid: int | None) -> bool:
    """True when process `pid` is stopped by a signal (state T: SIGSTOP, SIGTSTP; Linux /proc; False
    elsewhere). Not a tracing stop (t: a py-spy or strace sample pauses it for a moment): that one exits in time."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False
