"""llguidance's grammar compiles, each on a thread of its own with a GRAMMAR_STACK_BYTES stack.

llguidance compiles a JSON schema's `$ref`s, and a Lark grammar's rules, by recursion: one level for each definition
a chain of them reaches. Measured with llguidance 1.9.1 on a thread's default 8 MiB stack: a chain of ~950
`{"type": "object", "properties": {"a": {"$ref": next}}}` definitions (a 76 KB schema), ~2,500 `{"$ref": next}`, or
~2,700 Lark rules `r1: "x" r2?` overflowed it, and a stack overflow is SIGSEGV: the whole server gone, every request
with it. The deepest chain llguidance compiles at all is bounded by its own limit on a JSON schema's subschemas (50,000:
"schema too large"), which the chains above reach using ~170 MB of stack (up to 4.4 KB a level), and for grammar text by
engine/grammar_size.MAX_GRAMMAR_CHARS (~16,000 rules, ~55 MB). A thread's stack is address space, touched only as deep
as the compile goes: 512 MiB costs nothing until a chain that deep comes.

Only the compile needs it: a matcher's masks and tokens (computed on the engine thread) walk the grammar without
recursion (a 40,000-definition chain ran on 8 MiB).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")

GRAMMAR_STACK_BYTES = 512 << 20
# A compile inside engine/grammar_size's bounds takes ~1 s of CPU at worst; this is for a host far too loaded to serve.
COMPILE_TIMEOUT_S = 60.0

# threading.stack_size is process-wide: each compile thread is started between setting it and putting it back, one at a
# time (a thread another module starts meanwhile gets the large stack too: address space, not memory).
_spawn_lock = threading.Lock()


def on_grammar_stack(compile_grammar: Callable[[], T], timeout_s: float = COMPILE_TIMEOUT_S) -> T:
    """What `compile_grammar()` returns or raises, run on a new thread with a GRAMMAR_STACK_BYTES stack. TimeoutError
    when it takes more than `timeout_s` (the thread runs on to its end: a compile cannot be stopped)."""
    outcome: list[T] = []
    failure: list[BaseException] = []

    def run() -> None:
        try:
            outcome.append(compile_grammar())
        except BaseException as exc:  # noqa: BLE001 - raised again in the caller's thread
            failure.append(exc)

    with _spawn_lock:
        previous = threading.stack_size(GRAMMAR_STACK_BYTES)
        try:
            thread = threading.Thread(target=run, name="llguidance-compile", daemon=True)
            thread.start()
        finally:
            threading.stack_size(previous)
    thread.join(timeout_s)
    if thread.is_alive():
        raise TimeoutError(f"compiling the grammar took more than {timeout_s:.0f} s")
    if failure:
        raise failure[0]
    return outcome[0]
