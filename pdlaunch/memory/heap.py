"""Python's cyclic garbage collector, kept off the serving path.

A full collection walks every tracked object of the process. A serving process holds millions (torch, the
model's modules and parameters, the tokenizer, transformers), and on an H200 host a full collection in the
middle of serving paused the engine loop for about 86 ms, up to four times in one step (cProfile of an 8B
instance, Python 3.12, where a collection runs at the next function call of whatever code is running). Every
stream in the batch waits that long for its next token: those pauses were the ITL p99 of a colocated instance.

The proxy's process holds fewer (~69k objects once its app and tokenizer are built), but every stream it relays
waits for a collection all the same: on a 2-core CI host one full collection in the middle of a `bench serve` run
took 51 ms, and none ran there once the proxy froze its heap too.

`freeze_startup_heap` moves everything alive once the engine is built into the collector's permanent
generation (`gc.freeze`), so later collections walk only what serving creates. `thaw_heap` undoes it when the
engine shuts down, so a process that builds several engines one after another (tests, `pdlaunch bench`) can
still free the old ones. There is no full collection before the freeze: it cost 0.2 s per engine on an H200 host
and more in a test process that builds hundreds (the CPU suite took 6 minutes longer). Cyclic garbage left from
startup is freed at shutdown instead: tensors freed by reference counting, as the memory profile's are, are gone
already.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger(__name__)


def freeze_startup_heap() -> int:
    """Freeze every object alive; returns how many the collector will no longer walk."""
    started = time.perf_counter()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("froze %d startup objects out of the garbage collector's walks (%.2f s)", frozen,
             time.perf_counter() - started)
    return frozen


def thaw_heap() -> None:
    """Give the frozen objects back to the collector (what shutting an engine down frees becomes collectable)."""
    gc.unfreeze()
