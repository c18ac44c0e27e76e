"""MemorySleep level/tag rules on real memory: the TensorSleepBackend really frees and restores
tensor storages (CPU here; the CuMem backend is covered by test_cumem.py on a GPU)."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from pdlaunch.memory.sleep import MemorySleep, SleepModeError, TensorSleepBackend, parse_tags


class Instance:
    """A tiny 'engine': weights (a 2-layer MLP saved as a checkpoint) and a KV cache tensor."""

    def __init__(self, ckpt_dir: Path) -> None:
        torch.manual_seed(0)
        self.model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 8))
        self.ckpt = ckpt_dir / "model.safetensors"
        save_file({k: v.contiguous() for k, v in self.model.state_dict().items()}, str(self.ckpt))
        self.kv_cache = torch.randn(4, 2, 8, 16)  # [num_blocks, k/v, block_size, head_dim]
        self.backend = TensorSleepBackend()
        self.backend.register("weights", self.model.parameters())
        self.backend.register("kv_cache", [self.kv_cache])
        self.reloads = 0
        self.controller = MemorySleep(self.backend, reload_weights=self.reload_weights)
        self.x = torch.randn(3, 16)

    def reload_weights(self) -> None:
        self.reloads += 1
        self.model.load_state_dict(load_file(str(self.ckpt)))

    def forward(self) -> torch.Tensor:
        with torch.no_grad():
            return self.model(self.x)

    def weight_bytes(self) -> int:
        return sum(p.untyped_storage().nbytes() for p in self.model.parameters())


@pytest.fixture
def instance(tmp_path: Path) -> Instance:
    return Instance(tmp_path)


def test_level1_keeps_weights_and_discards_kv(instance: Instance) -> None:
    before = instance.forward()
    weight_bytes = instance.weight_bytes()
    kv_bytes = instance.kv_cache.untyped_storage().nbytes()

    result = instance.controller.sleep(level=1)

    assert instance.controller.is_sleeping() and instance.controller.level == 1
    assert result.freed_bytes == weight_bytes + kv_bytes
    assert instance.backend.usage_by_tag() == {"weights": 0, "kv_cache": 0}

    woke = instance.controller.wake_up()
    assert woke.tags == ["kv_cache", "weights"] and not woke.is_sleeping
    assert not instance.controller.is_sleeping() and instance.controller.level is None
    assert torch.equal(instance.forward(), before)
    assert instance.reloads == 0  # level 1 restores from the CPU copy, not the checkpoint
    assert instance.kv_cache.untyped_storage().nbytes() == kv_bytes


def test_level2_reloads_weights_from_checkpoint(instance: Instance) -> None:
    before = instance.forward()
    instance.controller.sleep(level=2)
    instance.controller.wake_up(["weights"])
    assert instance.reloads == 1
    assert torch.equal(instance.forward(), before)
    assert instance.controller.is_sleeping()  # kv_cache still released
    instance.controller.wake_up(["kv_cache"])
    assert instance.reloads == 1 and not instance.controller.is_sleeping()


def test_partial_wake_keeps_instance_asleep(instance: Instance) -> None:
    instance.controller.sleep(level=1)
    result = instance.controller.wake_up("weights")
    assert result.tags == ["weights"] and result.is_sleeping
    assert instance.backend.asleep_tags() == {"kv_cache"}
    assert instance.backend.usage_by_tag()["kv_cache"] == 0
    result = instance.controller.wake_up("weights,kv_cache")
    assert result.tags == ["kv_cache"] and not result.is_sleeping


def test_double_sleep_and_double_wake_are_safe(instance: Instance) -> None:
    before = instance.forward()
    assert instance.controller.sleep(level=1).freed_bytes > 0
    again = instance.controller.sleep(level=2)  # must not overwrite the level-1 backup with nothing
    assert again.freed_bytes == 0 and again.level == 1 and instance.controller.level == 1
    assert instance.controller.wake_up().restored_bytes > 0
    repeat = instance.controller.wake_up()
    assert repeat.restored_bytes == 0 and repeat.tags == []
    assert torch.equal(instance.forward(), before)
    assert instance.reloads == 0


def test_hooks_run_around_memory_operations(instance: Instance) -> None:
    events: list[tuple[str, object, int]] = []
    instance.controller.add_before_sleep_hook(lambda level: events.append(("before", level, instance.weight_bytes())))
    instance.controller.add_after_wake_hook(lambda tags: events.append(("after", tags, instance.weight_bytes())))
    full = instance.weight_bytes()
    instance.controller.sleep(level=1)
    instance.controller.wake_up(["kv_cache"])
    instance.controller.wake_up(["weights"])
    assert events == [("before", 1, full), ("after", ("kv_cache",), 0), ("after", ("weights",), full)]


def test_failing_before_sleep_hook_aborts_sleep(instance: Instance) -> None:
    def refuse(level: int) -> None:
        raise RuntimeError("transfers still running")

    instance.controller.add_before_sleep_hook(refuse)
    with pytest.raises(RuntimeError, match="transfers still running"):
        instance.controller.sleep(level=1)
    assert not instance.controller.is_sleeping()
    assert instance.weight_bytes() > 0 and instance.backend.asleep_tags() == set()


def test_bad_level_and_tags_are_refused_before_anything_happens(instance: Instance, tmp_path: Path) -> None:
    with pytest.raises(SleepModeError) as err:
        instance.controller.sleep(level=3)
    assert err.value.field == "level"
    no_reload = MemorySleep(TensorSleepBackend())
    with pytest.raises(SleepModeError, match="reload") as err:
        no_reload.sleep(level=2)
    assert err.value.field == "level" and not no_reload.is_sleeping()
    instance.controller.sleep(level=1)
    with pytest.raises(SleepModeError) as err:
        instance.controller.wake_up(["weights", "activations"])
    assert err.value.field == "tags" and "activations" in err.value.message
    assert instance.backend.asleep_tags() == {"weights", "kv_cache"}


def test_concurrent_call_is_refused_while_sleep_runs(instance: Instance) -> None:
    entered, release = threading.Event(), threading.Event()

    def slow_hook(level: int) -> None:
        entered.set()
        assert release.wait(timeout=30), "test never released the sleeping thread"

    instance.controller.add_before_sleep_hook(slow_hook)
    sleeper = threading.Thread(target=instance.controller.sleep, args=(1,))
    sleeper.start()
    try:
        assert entered.wait(timeout=30), "sleep never reached its hook"
        with pytest.raises(SleepModeError, match="already in progress"):
            instance.controller.wake_up()
    finally:
        release.set()
        sleeper.join(timeout=30)
    assert not sleeper.is_alive() and instance.controller.is_sleeping()
    instance.controller.wake_up()
    assert not instance.controller.is_sleeping()


def test_parse_tags() -> None:
    assert parse_tags(None) is None and parse_tags("") is None and parse_tags([]) is None
    assert parse_tags("weights, kv_cache,weights") == ("weights", "kv_cache")
    assert parse_tags(["kv_cache"]) == ("kv_cache",)
    with pytest.raises(SleepModeError) as err:
        parse_tags("weight")
    assert err.value.field == "tags" and "weights" in (err.value.hint or "")


def test_views_share_one_storage() -> None:
    backend = TensorSleepBackend()
    base = torch.arange(64, dtype=torch.float32)
    backend.register("weights", [base, base[:32], base.view(8, 8)])
    nbytes = base.untyped_storage().nbytes()
    assert backend.sleep(offload_tags=("weights",)) == nbytes
    backend.wake_up()
    assert torch.equal(base, torch.arange(64, dtype=torch.float32))


def test_level2_wake_reloads_the_weights_before_the_kv_cache_takes_memory_again(instance: Instance) -> None:
    """The reload builds a second copy of the weights on the device: it fits only while the KV cache's memory is
    still released (on a GPU the KV cache takes most of what the weights leave). A plain wake_up after level 2
    maps the weights, reloads them, and only then maps the KV cache."""
    before = instance.forward()
    asleep_at_reload: list[set[str]] = []

    def reload_weights() -> None:
        asleep_at_reload.append(instance.backend.asleep_tags())
        instance.reload_weights()

    controller = MemorySleep(instance.backend, reload_weights=reload_weights)
    controller.sleep(level=2)
    result = controller.wake_up()
    assert asleep_at_reload == [{"kv_cache"}]
    assert result.tags == ["kv_cache", "weights"] and not result.is_sleeping
    assert result.restored_bytes == instance.weight_bytes() + instance.kv_cache.untyped_storage().nbytes()
    assert torch.equal(instance.forward(), before)
