"""The parent's end of one `pdlaunch bench kv-transfer` worker process (kv_transfer_worker.py): starts it, sends
it commands and waits for each answer, saying which worker died and how when one is gone."""

from __future__ import annotations

import multiprocessing as mp
import signal
import threading
import time
from typing import Any

from pdlaunch.bench.kv_transfer_worker import Shape, worker
from pdlaunch.errors import KVTransferError, exit_text

_CALL_TIMEOUT = 300.0


class _WorkerExited(KVTransferError):
    """A worker process is gone (killed for memory, by a user, or crashed in native code)."""


def _exit_text(code: int | None) -> str:
    """How a worker ended (errors.exit_text); None: its pipe closed, but its process has not exited within the wait."""
    return "closed its pipe but has not exited" if code is None else exit_text(code)


class Side:
    def __init__(self, role: str, shape: Shape, device: str) -> None:
        self.role = role
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker, args=(child, role, shape, device), daemon=True)
        # Ctrl-C reaches the whole process group: the worker is born ignoring SIGINT (the disposition survives
        # spawn's exec), and this process stops it, so that the connector shuts down once and no worker prints a
        # KeyboardInterrupt traceback, even during its imports.
        main = threading.current_thread() is threading.main_thread()
        previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
        try:
            self.proc.start()
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        child.close()  # the worker's end: once the worker is gone, reading this end says so at once
        try:
            self._answer("start")
        except BaseException:  # Ctrl-C or a failed start: a worker still building its KV cache waits for nothing
            self.proc.kill()
            self.proc.join(10)
            raise

    def _exited(self, what: str) -> _WorkerExited:
        self.proc.join(5)  # the pipe closes as the process ends; its exit code comes a moment later
        return _WorkerExited(f"kv-transfer bench: the {self.role} worker {_exit_text(self.proc.exitcode)} "
                             f"before it answered {what}")

    def _answer(self, what: str) -> Any:
        deadline = time.monotonic() + _CALL_TIMEOUT
        while not self.conn.poll(1.0):  # a worker that died (e.g. killed for memory) answers nothing: say so
            if not self.proc.is_alive():
                raise self._exited(what)
            if time.monotonic() > deadline:
                raise KVTransferError(f"kv-transfer bench: the {self.role} worker did not answer {what} within "
                                      f"{_CALL_TIMEOUT:g}s")
        try:
            status, value = self.conn.recv()
        except (EOFError, OSError):  # poll() also returns at once for a pipe whose other end is gone
            raise self._exited(what) from None
        if status != "ok":
            raise KVTransferError(f"kv-transfer bench: {self.role} {what} failed in the worker: {value}")
        return value

    def __call__(self, cmd: str, *args: object) -> Any:
        try:
            self.conn.send((cmd, args))
        except OSError:
            raise self._exited(cmd) from None
        return self._answer(cmd)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self.conn.send(("close", ()))
                if self.conn.poll(30):
                    self.conn.recv()
        except (OSError, EOFError):
            pass
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join(5)


def dead_side_named(exc: KVTransferError, sides: tuple[Side | None, ...]) -> KVTransferError:
    """A command that failed because the other side's worker died (a decode load from a killed prefill ends in
    NIXL_ERR_REMOTE_DISCONNECT) says first which worker died."""
    if isinstance(exc, _WorkerExited):
        return exc
    for side in sides:  # a killed worker's connections close a moment before it can be reaped
        if side is not None:
            side.proc.join(0.5)
    dead = [side for side in sides if side is not None and not side.proc.is_alive()]
    if not dead:
        return exc
    return KVTransferError(f"kv-transfer bench: the {dead[0].role} worker "
                           f"{_exit_text(dead[0].proc.exitcode)} during the run; then "
                           + exc.message.removeprefix("kv-transfer bench: "), hint=exc.hint)


def start_side(role: str, shape: Shape, device: str, cache_gib: float) -> Side:
    """One side's worker, started; a start that fails (most often: no memory for the KV cache) names the flags."""
    try:
        return Side(role, shape, device)
    except KVTransferError as exc:
        raise KVTransferError(exc.message, hint=f"each side's synthetic KV cache is {cache_gib:.3g} GiB on {device}; "
                              "--num-tokens, --concurrency, --num-layers, --num-kv-heads and --head-dim set its size"
                              ) from None

