"""An object in its own process (multiprocessing spawn), driven over a pipe by the test.

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
        ctx = mp.get_context("spawn")
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
