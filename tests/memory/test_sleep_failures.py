"""Sleep and wake calls that raise halfway leave a state the next call can finish from: memory
released by a failed sleep comes back and the before-sleep hooks' work is redone; a wake whose reload,
hook or allocation failed is redone by the next wake_up."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from pdlaunch.memory.sleep import MemorySleep, TensorSleepBackend
from tests.memory.test_sleep import Instance


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    return Instance(tmp_path)


def test_level2_wake_whose_reload_failed_reloads_on_the_next_wake(instance: Instance) -> None:
    before = instance.forward()
    attempts: list[int] = []

    def reload_fails_once() -> None:
        attempts.append(1)
        if len(attempts) == 1:
            raise RuntimeError("checkpoint unreadable")
        instance.reload_weights()

    controller = MemorySleep(instance.backend, reload_weights=reload_fails_once)
    controller.sleep(level=2)
    with pytest.raises(RuntimeError, match="checkpoint unreadable"):
        controller.wake_up()
    assert controller.is_sleeping()  # the weights' memory is back but holds no weights yet
    result = controller.wake_up()
    assert len(attempts) == 2 and "weights" in result.tags and not result.is_sleeping
    assert torch.equal(instance.forward(), before)


def test_wake_whose_after_wake_hook_failed_runs_it_again(instance: Instance) -> None:
    calls: list[tuple[str, ...]] = []

    def reregister_fails_once(tags: tuple[str, ...]) -> None:
        calls.append(tags)
        if len(calls) == 1:
            raise RuntimeError("KV registration failed")

    instance.controller.add_after_wake_hook(reregister_fails_once)
    instance.controller.sleep(level=1)
    with pytest.raises(RuntimeError, match="KV registration failed"):
        instance.controller.wake_up()
    assert instance.controller.is_sleeping()
    result = instance.controller.wake_up()
    assert calls == [("kv_cache", "weights"), ("kv_cache", "weights")]
    assert result.tags == ["kv_cache", "weights"] and not instance.controller.is_sleeping()


class FailingSleep:
    """A backend whose sleep raises, before releasing anything or after releasing everything."""

    def __init__(self, inner: TensorSleepBackend, after_release: bool) -> None:
        self.inner = inner
        self.after_release = after_release

    def sleep(self, offload_tags: Sequence[str]) -> int:
        if self.after_release:
            self.inner.sleep(offload_tags)
        raise RuntimeError("pinned host memory exhausted")

    def wake_up(self, tags: Sequence[str] | None = None) -> int:
        return self.inner.wake_up(tags)

    def asleep_tags(self) -> set[str]:
        return self.inner.asleep_tags()


@pytest.mark.parametrize("after_release", [False, True])
def test_failed_sleep_wakes_what_it_released_and_redoes_the_hooks_work(instance: Instance, after_release: bool) -> None:
    """The before-sleep hooks ran (an engine's connector dropped its staging buffer and KV registration):
    the after-wake hooks run on every tag, so the instance is left awake and whole."""
    before = instance.forward()
    events: list[object] = []
    controller = MemorySleep(FailingSleep(instance.backend, after_release), reload_weights=instance.reload_weights)
    controller.add_before_sleep_hook(lambda level: events.append(("before", level)))
    controller.add_after_wake_hook(lambda tags: events.append(("after", tags)))
    with pytest.raises(RuntimeError, match="pinned host memory exhausted"):
        controller.sleep(level=1)
    assert events == [("before", 1), ("after", ("kv_cache", "weights"))]
    assert not controller.is_sleeping() and instance.backend.asleep_tags() == set()
    assert torch.equal(instance.forward(), before) and instance.reloads == 0


def test_wake_that_ran_out_of_memory_halfway_resumes(instance: Instance, monkeypatch: pytest.MonkeyPatch) -> None:
    """TensorSleepBackend: the second weight tensor's storage cannot be re-allocated; the next wake
    restores the rest from the CPU copies kept at sleep."""
    before = instance.forward()
    instance.controller.sleep(level=1)
    real_resize = torch.UntypedStorage.resize_
    grown: list[int] = []

    def out_of_memory_on_second_grow(storage: torch.UntypedStorage, nbytes: int) -> torch.UntypedStorage:
        if nbytes:
            grown.append(nbytes)
            if len(grown) == 2:
                raise RuntimeError("DefaultCPUAllocator: can't allocate memory")
        return real_resize(storage, nbytes)

    monkeypatch.setattr(torch.UntypedStorage, "resize_", out_of_memory_on_second_grow)
    with pytest.raises(RuntimeError, match="can't allocate memory"):
        instance.controller.wake_up(["weights"])
    assert instance.controller.is_sleeping() and "weights" in instance.backend.asleep_tags()
    monkeypatch.undo()
    result = instance.controller.wake_up(["weights"])
    assert result.tags == ["weights"]
    assert torch.equal(instance.forward(), before) and instance.reloads == 0


def test_a_before_sleep_hook_that_raises_undoes_the_hooks_before_it(instance: Instance) -> None:
    """Two hooks (say: the connector drops its KV registration, then a second check refuses): the first hook's
    undo puts its work back, newest first, and nothing is released. It used to leave the first hook's work done
    on an instance that stays awake."""
    before = instance.forward()
    events: list[tuple[str, int]] = []
    registered = [True]

    def deregister(level: int) -> None:
        events.append(("deregister", level))
        registered[0] = False

    def reregister(level: int) -> None:
        events.append(("reregister", level))
        registered[0] = True

    def refuse(level: int) -> None:
        events.append(("refuse", level))
        raise RuntimeError("a transfer started meanwhile")

    instance.controller.add_before_sleep_hook(lambda level: events.append(("check", level)))  # nothing to undo
    instance.controller.add_before_sleep_hook(deregister, undo=reregister)
    instance.controller.add_before_sleep_hook(refuse, undo=lambda level: events.append(("undo refuse", level)))
    with pytest.raises(RuntimeError, match="a transfer started meanwhile"):
        instance.controller.sleep(level=1)
    assert events == [("check", 1), ("deregister", 1), ("refuse", 1), ("reregister", 1)]
    assert registered[0] and not instance.controller.is_sleeping()
    assert instance.backend.asleep_tags() == set() and torch.equal(instance.forward(), before)
