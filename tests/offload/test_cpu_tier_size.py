"""A CPU offload tier that cannot be allocated is refused naming --kv-offload-gb, not with torch's allocator error,
and one larger than the memory this process may still take (MemAvailable, a cgroup's memory limit less its usage)
is refused before it is zeroed: zeroing it would get the process killed for memory with no pdlaunch error. The
host's readers are pointed at files written here (memory/host_devices.py: MEMINFO, PROC_CGROUP, CGROUP_MOUNT)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.memory import host_devices
from pdlaunch.memory.host_devices import AvailableMemory
from pdlaunch.offload import cpu_tier
from pdlaunch.offload.cpu_tier import CPUTier
from tests.engine.conftest import MakeEngine

SHAPE = (1, 2, 4, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
PER_BLOCK = CPUTier.bytes_per_block([SHAPE], torch.float32)
PIB_OF_BLOCKS = 2**50 // PER_BLOCK  # 1 PiB: past any host and address space
GIB = 1 << 30
UNLIMITED_V1 = "9223372036854771712"


class Zeroed(Exception):
    pass


def _refuse_zeroing(monkeypatch: pytest.MonkeyPatch) -> None:
    def zeroed_region(*args: object) -> torch.Tensor:  # stands in for zeroing a tier of that size
        raise Zeroed("the tier would have been zeroed now")

    monkeypatch.setattr(cpu_tier, "zeroed_region", zeroed_region)


def _host(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, mem_available_gib: float | None,
          proc_cgroup: str = "0::/\n", cgroups: dict[str, dict[str, str]] | None = None, v2: bool = True) -> None:
    """This host as the readers see it: /proc/meminfo, /proc/self/cgroup and the cgroup files
    ({directory under the mount: {file: text}})."""
    meminfo = tmp_path / "meminfo"
    lines = "MemTotal:       263000000 kB\nMemFree:         1000000 kB\n"
    if mem_available_gib is not None:
        lines += f"MemAvailable:   {int(mem_available_gib * 2**20)} kB\n"
    meminfo.write_text(lines)
    (tmp_path / "proc_cgroup").write_text(proc_cgroup)
    mount = tmp_path / "cgroup"
    mount.mkdir()
    if v2:
        (mount / "cgroup.controllers").write_text("cpu memory pids\n")
    for directory, files in (cgroups or {}).items():
        (mount / directory).mkdir(parents=True, exist_ok=True)
        for name, text in files.items():
            (mount / directory / name).write_text(text)
    monkeypatch.setattr(host_devices, "MEMINFO", meminfo)
    monkeypatch.setattr(host_devices, "PROC_CGROUP", tmp_path / "proc_cgroup")
    monkeypatch.setattr(host_devices, "CGROUP_MOUNT", mount)


def _refused(num_blocks: int) -> EngineError:
    with pytest.raises(EngineError) as err:
        CPUTier(num_blocks, [SHAPE], torch.float32, pin_memory=False)
    assert err.value.field == "cache.kv_offload_gb"
    assert "--kv-offload-gb" in (err.value.hint or "")
    return err.value


def test_tier_larger_than_host_memory_names_the_flag() -> None:
    err = _refused(PIB_OF_BLOCKS)
    assert "needs 1048576.00 GiB of host memory but only" in err.message and "GiB is available (" in err.message


def test_tier_past_mem_available_is_refused_before_zeroing(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Less than the RAM (250 GiB here), more than MemAvailable: other processes hold the rest."""
    _host(monkeypatch, tmp_path, mem_available_gib=1.0)
    _refuse_zeroing(monkeypatch)
    err = _refused(int(1.5 * GIB) // PER_BLOCK)
    assert "needs 1.50 GiB of host memory but only 1.00 GiB is available (MemAvailable of" in err.message
    assert "below 1.00" in (err.hint or "")


def test_tier_past_a_cgroup_v2_limit_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """A pod limited to 4 GiB, 3 GiB charged of which 0.5 GiB is inactive file cache: 1.5 GiB of room, though the
    host has 64 GiB available. A parent without a limit ("max") does not count."""
    _host(monkeypatch, tmp_path, mem_available_gib=64, proc_cgroup="0::/kubepods/pod1\n", cgroups={
        "kubepods": {"memory.max": "max\n", "memory.current": str(40 * GIB)},
        "kubepods/pod1": {"memory.max": f"{4 * GIB}\n", "memory.current": f"{3 * GIB}\n",
                          "memory.stat": f"anon {2 * GIB}\nfile {GIB}\ninactive_file {GIB // 2}\n"}})
    assert CPUTier(2**20 // PER_BLOCK, [SHAPE], torch.float32, pin_memory=False).num_blocks > 0  # 1 MiB fits
    _refuse_zeroing(monkeypatch)
    err = _refused(2 * GIB // PER_BLOCK)
    assert ("needs 2.00 GiB of host memory but only 1.50 GiB is available (the cgroup memory limit of 4.00 GiB "
            "less 2.50 GiB in use (") in err.message and "kubepods/pod1/memory.max" in err.message


def test_a_parent_cgroups_lower_room_counts(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _host(monkeypatch, tmp_path, mem_available_gib=64, proc_cgroup="0::/slice/job\n", cgroups={
        "slice": {"memory.max": f"{8 * GIB}\n", "memory.current": f"{7 * GIB}\n"},
        "slice/job": {"memory.max": f"{6 * GIB}\n", "memory.current": f"{2 * GIB}\n"}})
    assert host_devices.available_memory() == AvailableMemory(
        GIB, f"the cgroup memory limit of 8.00 GiB less 7.00 GiB in use ({tmp_path / 'cgroup/slice/memory.max'})")


def test_tier_past_a_cgroup_v1_limit_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """cgroup v1 (this host's own layout): the memory controller's directory, "no limit" written as 2**63 less a
    page at the root, the inactive file cache as total_inactive_file."""
    _host(monkeypatch, tmp_path, mem_available_gib=64, v2=False,
          proc_cgroup="9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n", cgroups={
              "memory": {"memory.limit_in_bytes": UNLIMITED_V1, "memory.usage_in_bytes": str(50 * GIB)},
              "memory/docker/abc": {"memory.limit_in_bytes": f"{2 * GIB}\n", "memory.usage_in_bytes": f"{GIB}\n",
                                    "memory.stat": f"inactive_file 1\ntotal_inactive_file {GIB // 4}\n"}})
    _refuse_zeroing(monkeypatch)
    err = _refused(int(1.5 * GIB) // PER_BLOCK)
    assert "but only 1.25 GiB is available (the cgroup memory limit of 2.00 GiB less 0.75 GiB in use" in err.message


def test_a_container_sees_its_cgroup_as_the_root(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """/proc/self/cgroup names the host's path, which the container's mount does not have: its root is ours."""
    _host(monkeypatch, tmp_path, mem_available_gib=64, v2=False, proc_cgroup="4:memory:/kubepods/x/y\n", cgroups={
        "memory": {"memory.limit_in_bytes": f"{3 * GIB}", "memory.usage_in_bytes": f"{GIB}"}})
    available = host_devices.available_memory()
    assert available is not None and available.bytes == 2 * GIB and "limit of 3.00 GiB" in available.source


def test_without_a_limit_or_meminfo(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No cgroup limit: MemAvailable. No MemAvailable (not Linux, a kernel before 3.14): the physical RAM."""
    _host(monkeypatch, tmp_path, mem_available_gib=3, proc_cgroup="0::/user\n",
          cgroups={"user": {"memory.max": "max\n", "memory.current": str(GIB)}})
    assert host_devices.available_memory() == AvailableMemory(3 * GIB, f"MemAvailable of {tmp_path / 'meminfo'}")
    monkeypatch.setattr(host_devices, "MEMINFO", tmp_path / "absent")
    assert host_devices.available_memory() == AvailableMemory(host_devices.host_memory_bytes(), "the physical RAM")


def test_engine_start_refuses_a_tier_past_what_is_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                              hybrid_ckpt: Path, make_engine: MakeEngine) -> None:
    """Through the engine's start (what `pdlaunch serve` runs in each instance): the error names the setting."""
    _host(monkeypatch, tmp_path, mem_available_gib=0.0005)
    with pytest.raises(EngineError) as err:
        make_engine(hybrid_ckpt, block_size=4, num_gpu_blocks=12, kv_offload_gb=0.001)
    assert err.value.field == "cache.kv_offload_gb" and "GiB is available (MemAvailable of" in err.value.message


def test_tier_the_allocator_refuses_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the memory check (pinned memory has lower limits than RAM): torch's refusal becomes ours."""
    monkeypatch.setattr(cpu_tier, "available_memory", lambda: AvailableMemory(2**60, "test"))
    with pytest.raises(EngineError) as err:
        CPUTier(PIB_OF_BLOCKS, [SHAPE], torch.float32, pin_memory=False)
    assert err.value.field == "cache.kv_offload_gb"
    assert "could not be allocated" in err.value.message and "--kv-offload-gb" in (err.value.hint or "")
