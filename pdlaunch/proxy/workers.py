"""proxy.workers N > 1 (or auto resolved to N > 1, config/proxy_workers.py): N proxy processes accepting on one
listening socket.

One proxy process relays a few thousand stream events a second per core (benchmarks/proxy_relay.py; README,
"Proxy workers"): a fleet whose decodes stream more than that is bound by the proxy. With N workers, the
process the launcher starts (`python -m pdlaunch.proxy --workers N`) is a supervisor: it binds the client port
once and starts N workers (`python -m pdlaunch.proxy` with the same flags, the socket's descriptor as
`--listen-fd`, its index as `--worker-index`, the load board's file as `--load-board`, itself as `--parent-pid`).
Each worker is a whole proxy (its own health probes, KV event feeds and connection pools); the kernel hands each
new client connection to one of them. Their load counts are one view: legs in flight and prompt tokens queued or
spilled per instance live on a load board (load_board.py: one row per worker, read as the sum of the rows), so
least_loaded, the prefix policy's queue weights and disaggregate_max_queue_tokens weigh every worker's requests,
and each worker's round robin starts at its own index. The supervisor forwards SIGTERM / SIGINT to the workers
(each drains its own requests) and reaps them. When a worker exits while nothing asked it to, the supervisor stops
the others and exits 1, so the launcher sees the proxy die and restarts it (proxy.restart, with a new board)
rather than serving on with fewer workers than configured.

Their counters and histograms are summed into every worker's /metrics through prometheus_client's multiprocess
files (PROMETHEUS_MULTIPROC_DIR, a directory the supervisor makes and removes, the load board's file with them); the
per-instance in-flight gauge and /instances' in_flight count every worker's legs; instance states (/health, the up
gauge, /instances' state) are the answering worker's own probes. The supervisor makes that directory in
`--tmp-dir DIR` when given (the launcher passes a directory of its own, new for every start of the proxy): a proxy the
launcher SIGKILLs (a hurried stop, a stall or restart kill) never reaches its own removal, and the launcher removes
DIR, the proxy's files in it, once it has reaped the proxy and killed its group (launcher/process.py). Run alone, the
supervisor makes it in TMPDIR. Either way every start has a new, empty one: a dead proxy's counters are never summed
into its successor's.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

from pdlaunch.errors import exit_text
from pdlaunch.proxy.load_board import LoadBoard
from pdlaunch.proxy.metrics import MULTIPROC_ENV
from pdlaunch.server.watchdog import watch_parent
from pdlaunch.signal_flag import SignalFlag

log = logging.getLogger(__name__)

POLL_S = 0.2
KILL_GRACE_S = 15.0  # past the drain timeout, before a worker that has not exited is killed
KILL_WAIT_S = 10.0  # after SIGKILL: a worker still there then is stuck in the kernel, and is named and left
LISTEN_BACKLOG = 2048


def worker_argv(argv: list[str], fd: int, index: int, board: Path) -> list[str]:
    """A worker's command-line flags: the supervisor's, without --workers, --parent-pid (the supervisor is the
    worker's parent), --load-board and --tmp-dir (the supervisor's alone), with the listening socket's descriptor, the
    worker's index and the load board's file. (A process given --listen-fd never supervises, whatever --workers says;
    of two --parent-pid the last, ours, wins.)"""
    out: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split("=", 1)[0]
        if name in ("--workers", "--parent-pid", "--load-board", "--tmp-dir"):
            skip = "=" not in arg
            continue
        out.append(arg)
    return out + ["--listen-fd", str(fd), "--worker-index", str(index), "--load-board", str(board),
                  "--parent-pid", str(os.getpid())]


def listening_socket(host: str, port: int) -> socket.socket:
    """The client port, bound once for every worker (inheritable: the workers accept on it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise SystemExit(f"proxy: cannot listen on {host}:{port}: {exc.strerror or exc} (proxy.port: another "
                         "process has it; pick another port)") from None
    sock.listen(LISTEN_BACKLOG)
    sock.set_inheritable(True)
    return sock


class Supervisor:
    """Starts, watches and stops the workers (module doc)."""

    def __init__(self, argv: list[str], host: str, port: int, workers: int, drain_s: float,
                 parent_pid: int | None, instances: list[str], tmp_dir: Path | None = None) -> None:
        self.argv, self.host, self.port, self.workers = argv, host, port, workers
        self.instances = instances  # their names, in the order every worker's pool has them (the load board's)
        self.drain_s, self.parent_pid = drain_s, parent_pid
        self.tmp_dir = tmp_dir  # where the metrics directory is made (None: TMPDIR); module doc
        self.procs: list[subprocess.Popen[bytes]] = []
        # a signal or the launcher gone: every worker was asked to stop. A SignalFlag, not a threading.Event: the
        # signal handler sets it, and an Event's set() there waited for good when the main thread was inside set()
        self._stop = SignalFlag()

    def request_stop(self, why: str) -> None:
        if self._stop.is_set():
            return
        log.info("stopping %d workers (%s)", len(self.procs), why)
        self._stop.set()
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def run(self) -> int:
        sock = listening_socket(self.host, self.port)
        metrics_dir = tempfile.mkdtemp(prefix="pdlaunch-proxy-metrics-", dir=self.tmp_dir)
        env = dict(os.environ, **{MULTIPROC_ENV: metrics_dir})
        # Not among the metrics files (prometheus_client reads every *.db there): a sibling in the same directory.
        board = Path(metrics_dir) / "load-board"
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            LoadBoard.create(board, self.instances, self.workers)
            for index in range(self.workers):
                self.procs.append(subprocess.Popen(
                    [sys.executable, "-m", "pdlaunch.proxy", *worker_argv(self.argv, sock.fileno(), index, board)],
                    pass_fds=[sock.fileno()], env=env))
            log.info("proxy on %s:%d: %d workers (pids %s)", self.host, self.port, self.workers,
                     ", ".join(str(p.pid) for p in self.procs))
            if self._stop.is_set():  # a signal while they were starting reached only those started before it
                for proc in self.procs:
                    proc.send_signal(signal.SIGTERM)
            if self.parent_pid is not None:
                watch_parent(self.parent_pid, lambda: self.request_stop("the launcher is gone"))
            return self._watch()
        finally:
            self._stop.set()
            self._reap()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            sock.close()
            shutil.rmtree(metrics_dir, ignore_errors=True)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        # The flag, a log line and SIGTERM to the workers; the watch loop sees the flag within POLL_S.
        self.request_stop(signal.Signals(signum).name)

    def _watch(self) -> int:
        """Until every worker has exited: 0 when they were asked to stop and all exited 0, else 1. Once asked to
        stop, it waits at most the drain timeout + KILL_GRACE_S (then _reap kills what is left)."""
        failed = False
        stop_at: float | None = None
        while any(proc.poll() is None for proc in self.procs):
            if not self._stop.is_set():
                for index, proc in enumerate(self.procs):
                    code = proc.poll()
                    if code is not None:
                        log.error("proxy worker %d (pid %d) %s while serving; stopping the others so that the "
                                  "proxy restarts whole", index, proc.pid, exit_text(code))
                        failed = True
                        self.request_stop(f"worker {index} {exit_text(code)}")
                        break
            if self._stop.is_set():
                stop_at = time.monotonic() if stop_at is None else stop_at
                if time.monotonic() - stop_at > self.drain_s + KILL_GRACE_S:
                    return 1
            time.sleep(POLL_S)
        if not self._stop.is_set():  # every worker ended on its own
            return 1
        # uvicorn re-raises the signal it caught once it has shut down: a worker asked to stop ends by SIGTERM.
        clean = (0, -signal.SIGTERM, -signal.SIGINT)
        return 1 if failed or any(proc.returncode not in clean for proc in self.procs) else 0

    def _reap(self) -> None:
        """Every worker ends and is waited for: SIGTERM, then SIGKILL after KILL_GRACE_S."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + KILL_GRACE_S
        for index, proc in enumerate(self.procs):
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("proxy worker %d (pid %d) did not stop within %.0f s; killing it", index, proc.pid,
                          KILL_GRACE_S)
                proc.kill()
                try:
                    proc.wait(KILL_WAIT_S)
                except subprocess.TimeoutExpired:  # stuck in the kernel (a device or network filesystem wait)
                    log.error("proxy worker %d (pid %d) still runs %.0f s after SIGKILL (stuck in the kernel: "
                              "`ps -o pid,stat,wchan -p %d` shows where); leaving it", index, proc.pid,
                              KILL_WAIT_S, proc.pid)
