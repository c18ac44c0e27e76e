"""Sleep mode: an instance gives its accelerator memory back and takes it again later.

Sleep has three layers, each its own class: `MemorySleep` here (the memory), `EngineSleep`
(engine/sleep_mode.py: the engine's part) and the HTTP routes (server/sleep.py).
`MemorySleep` is owned by the engine. It holds the level/tag rules, runs the engine's hooks
around the memory operations (stop scheduling and deregister KV from NIXL before sleeping;
reload weights at level 2, re-create and re-register KV, recapture CUDA graphs after waking) and
delegates the memory work to a `SleepBackend`: the `CuMemAllocator` on GPUs, or the
`TensorSleepBackend` for plain tensors.

Level 1: weights are copied to (pinned) CPU memory and restored on wake; the KV cache is discarded.
Level 2: both are discarded; waking `weights` calls the engine's `reload_weights` (checkpoint), before any
other pool is mapped again: the reload's second copy of the weights needs the memory the KV cache takes.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Protocol

import torch
from pydantic import BaseModel

from pdlaunch.errors import PdlaunchError

logger = logging.getLogger(__name__)

SLEEP_TAGS: tuple[str, ...] = ("weights", "kv_cache")
LEVEL_OFFLOAD_TAGS: dict[int, tuple[str, ...]] = {1: ("weights",), 2: ()}


class SleepModeError(PdlaunchError):
    """A sleep/wake request that cannot be served: bad level or tag, missing reload, already busy."""


class SleepBackend(Protocol):
    """Who owns the memory. Both methods must be safe to repeat (already asleep/awake parts are skipped)."""

    def sleep(self, offload_tags: Sequence[str]) -> int:
        """Release the memory of every tag, keeping a CPU copy of `offload_tags`. Returns bytes released."""
        ...

    def wake_up(self, tags: Sequence[str] | None = None) -> int:
        """Give memory back to `tags` (all when None), restoring copies kept at sleep. Returns bytes."""
        ...

    def asleep_tags(self) -> set[str]:
        """Tags whose memory is released now."""
        ...


class SleepResult(BaseModel):
    level: int
    freed_bytes: int
    seconds: float


class WakeResult(BaseModel):
    tags: list[str]
    restored_bytes: int
    seconds: float
    is_sleeping: bool


def parse_tags(tags: str | Iterable[str] | None, known: Sequence[str] = SLEEP_TAGS) -> tuple[str, ...] | None:
    """`"weights,kv_cache"` or `["weights"]` -> validated tuple; None or empty -> None (all tags)."""
    if tags is None:
        return None
    items = tags.split(",") if isinstance(tags, str) else list(tags)
    parsed = tuple(dict.fromkeys(t.strip() for t in items if t.strip()))
    unknown = sorted(set(parsed) - set(known))
    if unknown:
        raise SleepModeError(f"unknown tags {unknown}", field="tags", hint=f"use {', '.join(known)}")
    return parsed or None


class MemorySleep:
    """Sleep/wake state of one engine's memory. Calls are serialised; a call made while another runs is refused."""

    def __init__(self, backend: SleepBackend, reload_weights: Callable[[], None] | None = None,
                 tags: Sequence[str] = SLEEP_TAGS) -> None:
        self._backend = backend
        self._reload_weights = reload_weights
        self._tags = tuple(tags)
        self._busy = threading.Lock()
        self._level: int | None = None
        self._weights_need_reload = False
        self._unfinished: set[str] = set()  # woken tags whose reload or after-wake hooks have not succeeded
        # (hook, its undo or None): hook(level) runs before any memory is released, undo(level) puts back what it did
        self._before_sleep: list[tuple[Callable[[int], None], Callable[[int], None] | None]] = []
        self._after_wake: list[Callable[[tuple[str, ...]], None]] = []

    def add_before_sleep_hook(self, hook: Callable[[int], None], undo: Callable[[int], None] | None = None) -> None:
        """`hook(level)` runs before any memory is released; raising aborts the sleep. `undo(level)` puts back
        what the hook did (None: nothing to put back); it runs when a hook registered later raises, so the
        instance stays awake and as before. Should the memory's release fail instead, the after-wake hooks
        redo every tag (`_undo_sleep`)."""
        self._before_sleep.append((hook, undo))

    def add_after_wake_hook(self, hook: Callable[[tuple[str, ...]], None]) -> None:
        """`hook(tags)` runs after `tags` have memory again (and weights were reloaded at level 2)."""
        self._after_wake.append(hook)

    def is_sleeping(self) -> bool:
        return self._level is not None

    @property
    def level(self) -> int | None:
        """The level of the current sleep, None while fully awake."""
        return self._level

    def sleep(self, level: int = 1) -> SleepResult:
        if level not in LEVEL_OFFLOAD_TAGS:
            raise SleepModeError(f"sleep level must be 1 or 2, got {level}", field="level",
                                 hint="1 keeps weights in CPU memory, 2 discards them (reloaded on wake)")
        if level == 2 and self._reload_weights is None:
            raise SleepModeError("level 2 discards the weights but this engine has no way to reload them",
                                 field="level", hint="use level 1")
        with self._exclusive("sleep"):
            if self._level is not None:
                logger.info("sleep(level=%d) ignored: already asleep at level %s", level, self._level)
                return SleepResult(level=self._level or level, freed_bytes=0, seconds=0.0)
            start = time.perf_counter()
            self._run_before_sleep(level)
            try:
                freed = self._backend.sleep(LEVEL_OFFLOAD_TAGS[level])
            except BaseException:
                self._undo_sleep(level)
                raise
            self._level = level
            self._weights_need_reload = level == 2
            result = SleepResult(level=level, freed_bytes=freed, seconds=time.perf_counter() - start)
        logger.info("asleep at level %d: released %.2f GiB in %.3f s", level, freed / 2**30, result.seconds)
        return result

    def wake_up(self, tags: Sequence[str] | str | None = None) -> WakeResult:
        """Wake `tags` (None: everything). Waking part of the memory leaves the instance sleeping."""
        wanted = parse_tags(tags, self._tags)
        with self._exclusive("wake_up"):
            start = time.perf_counter()
            waking, restored = self._wake(wanted)
            sleeping = self.is_sleeping()
            result = WakeResult(tags=list(waking), restored_bytes=restored,
                                seconds=time.perf_counter() - start, is_sleeping=sleeping)
        logger.info("woke %s in %.3f s (still asleep: %s)", list(waking) or "nothing", result.seconds,
                    sorted(self._backend.asleep_tags()) or "none")
        return result

    def _wake(self, wanted: tuple[str, ...] | None) -> tuple[tuple[str, ...], int]:
        """Give `wanted` (None: all) memory, reload the weights after level 2, run the after-wake hooks.
        A tag stays unfinished until all of that succeeded: a wake_up after a failure redoes it."""
        pending = self._backend.asleep_tags() | self._unfinished
        waking = tuple(sorted(pending) if wanted is None else (t for t in wanted if t in pending))
        self._unfinished.update(waking)
        restored = 0
        if "weights" in waking and self._weights_need_reload and self._reload_weights is not None:
            # Level 2: the weights' memory comes back uninitialised and the reload builds a second copy of the
            # model on the device, which fits only while the KV cache's memory is still released (once mapped
            # it takes most of what the weights leave): weights first, reloaded, then the other pools.
            restored += self._backend.wake_up(["weights"])
            self._reload_weights()
            self._weights_need_reload = False
        if waking:  # the backend skips what is awake already (the weights reloaded above)
            restored += self._backend.wake_up(None if wanted is None else list(waking))
            for hook in self._after_wake:
                hook(waking)
        self._unfinished.difference_update(waking)
        if self._level is not None and not self._backend.asleep_tags() and not self._unfinished:
            self._level = None
        return waking, restored

    def _run_before_sleep(self, level: int) -> None:
        """The before-sleep hooks in order; when one raises, the undos of those that ran, newest first."""
        ran: list[Callable[[int], None] | None] = []
        try:
            for hook, undo in self._before_sleep:
                hook(level)
                ran.append(undo)
        except BaseException:
            for undo in reversed(ran):
                if undo is not None:
                    try:
                        undo(level)
                    except Exception:  # the first error is the one the caller must see; this one is logged
                        logger.exception("undoing a before-sleep hook after a later one failed")
            raise

    def _undo_sleep(self, level: int) -> None:
        """The backend raised after the before-sleep hooks ran (an engine's connector has dropped its
        staging buffer and KV registration): wake what it released and run the after-wake hooks on
        every tag, leaving the instance awake and whole. Should that fail too, the instance counts as
        asleep at `level` and a wake_up finishes it."""
        self._level = level
        self._weights_need_reload = level == 2 and "weights" in self._backend.asleep_tags()
        self._unfinished.update(self._tags)
        self._wake(None)

    @contextlib.contextmanager
    def _exclusive(self, what: str) -> Iterator[None]:
        if not self._busy.acquire(blocking=False):
            raise SleepModeError(f"cannot {what}: a sleep or wake_up is already in progress",
                                 field="sleep", hint="retry when it has finished")
        try:
            yield
        finally:
            self._busy.release()


class TensorSleepBackend:
    """Frees and restores the storages of registered tensors (any device). Unlike CuMem, a woken
    tensor's storage is a new allocation at a new address: fit for memory that nothing has
    registered or captured (CPU engines, tests), not for NIXL-registered KV or CUDA graphs.
    A registered tensor must not be touched while its tag is asleep: its storage has 0 bytes."""

    def __init__(self) -> None:
        self._tensors: dict[str, list[torch.Tensor]] = {}
        self._sizes: dict[str, list[int]] = {}  # bytes of each tensor's storage while awake
        self._backups: dict[str, list[torch.UntypedStorage | None]] = {}
        self._asleep: set[str] = set()

    def register(self, tag: str, tensors: Iterable[torch.Tensor]) -> None:
        """Put `tensors` under `tag`; tensors sharing a storage (views) are kept once."""
        if tag in self._asleep:
            raise SleepModeError(f"cannot register tensors under {tag!r} while it is asleep", field="tags")
        seen = {t.untyped_storage().data_ptr() for t in self._tensors.get(tag, [])}
        for tensor in tensors:
            ptr = tensor.untyped_storage().data_ptr()
            if ptr not in seen:
                seen.add(ptr)
                self._tensors.setdefault(tag, []).append(tensor)
                self._sizes.setdefault(tag, []).append(tensor.untyped_storage().nbytes())

    def sleep(self, offload_tags: Sequence[str]) -> int:
        freed = 0
        for tag, tensors in self._tensors.items():
            if tag in self._asleep:
                continue
            backups: list[torch.UntypedStorage | None] = []
            for tensor in tensors:
                storage = tensor.untyped_storage()
                backup = None
                if tag in offload_tags:
                    pinned = storage.device.type == "cuda"
                    backup = torch.empty(storage.nbytes(), dtype=torch.uint8, pin_memory=pinned).untyped_storage()
                    backup.copy_(storage)
                backups.append(backup)
            for tensor in tensors:
                freed += tensor.untyped_storage().nbytes()
                tensor.untyped_storage().resize_(0)
            self._backups[tag] = backups
            self._asleep.add(tag)
        return freed

    def wake_up(self, tags: Sequence[str] | None = None) -> int:
        restored = 0
        for tag in [t for t in self._tensors if t in self._asleep and (tags is None or t in tags)]:
            for tensor, nbytes, backup in zip(self._tensors[tag], self._sizes[tag], self._backups[tag]):
                storage = tensor.untyped_storage()
                if storage.nbytes() == nbytes:
                    continue  # restored by an earlier call that failed on a later tensor
                storage.resize_(nbytes)
                if backup is not None:
                    storage.copy_(backup)
                restored += nbytes
            del self._backups[tag]  # only now: a retry after a failure above still needs them
            self._asleep.discard(tag)
        return restored

    def asleep_tags(self) -> set[str]:
        return set(self._asleep)

    def usage_by_tag(self) -> dict[str, int]:
        """Bytes each tag's storages hold now (0 while asleep)."""
        return {tag: sum(t.untyped_storage().nbytes() for t in tensors) for tag, tensors in self._tensors.items()}
