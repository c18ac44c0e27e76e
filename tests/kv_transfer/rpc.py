"""An object in its own process (multiprocessing forkserver), driven over a pipe by the test.

`build` (a module-level function, importable in the child) returns (handlers, close, info): the
child answers ("name", args) with handlers[name](*args); close() runs at shutdown. Every call has a
timeout; `close` always reaps the process.
"""

from __future__ import annotations

import multiprocessing as mp
import traceback
from collections.abc import Callable
from typing import Any

CALL_TIMEOUT = 120.0
# Children fork from a server process that imported these once (per test process), instead of each
# starting a fresh interpreter that imports torch and the engine (~3.5 s of CPU a child on 2 cores). The
# server imports only: no thread, no CUDA, no UCX is started before a child forks. Children see the
# environment the server started with (no test here sets variables for them).
PRELOAD = ["torch", "pdlaunch.engine.llm_engine", "tests.kv_transfer.engine_procs", "tests.kv_transfer.pd_procs"]


def context() -> Any:
    """The multiprocessing context the engine processes of the tests start from."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(PRELOAD)
    return ctx

Built = tuple[dict[str, Callable[..., Any]], Callable[[], None], Any]


def _serve(conn: Any, build: Callable[..., Built], args: tuple[Any, ...]) -> None:
    try:
        handlers, close, info = build(*args)
        conn.send(("ok", info))
    except Exception:
        conn.send(("err", traceback.format_exc()))
        return
    try:
        while True:
            method, call_args = conn.recv()
            if method == "__close__":
                break
            try:
                conn.send(("ok", handlers[method](*call_args)))
            except Exception:
                conn.send(("err", traceback.format_exc()))
    finally:
        close()
        conn.send(("ok", None))


class ProcessRPC:
    def __init__(self, build: Callable[..., Built], *args: Any) -> None:
        ctx = context()
        self._conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_serve, args=(child, build, args), daemon=True)
        self.proc.start()
        try:
            self.info = self._result("start")
        except BaseException:
            self.close()
            raise

    def _result(self, what: str) -> Any:
        if not self._conn.poll(CALL_TIMEOUT):
            raise TimeoutError(f"process {self.proc.pid} did not answer {what} within {CALL_TIMEOUT}s")
        status, value = self._conn.recv()
        if status == "err":
            raise RuntimeError(f"{what} failed in process {self.proc.pid}:\n{value}")
        return value

    def call(self, method: str, *args: Any) -> Any:
        self._conn.send((method, args))
        return self._result(method)

    def close(self) -> None:
        try:
            if self.proc.is_alive():
                self._conn.send(("__close__", ()))
                if self._conn.poll(CALL_TIMEOUT):
                    self._conn.recv()
        except (OSError, EOFError):
            pass
        finally:
            self.proc.join(10)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(5)
