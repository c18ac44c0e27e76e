"""KVAgent with the real NIXL (UCX moves DRAM inside this process): its packed metadata follows its registrations."""

from __future__ import annotations

import time
import uuid

import pytest
import torch

from pdlaunch.kv_transfer.agent import KVAgent

pytest.importorskip("nixl")


def _write(src: KVAgent, src_tensor: torch.Tensor, dst_agent: str, dst_tensor: torch.Tensor) -> str:
    xfer = src.transfer("WRITE", [(src_tensor.data_ptr(), src_tensor.nbytes)],
                        [(dst_tensor.data_ptr(), dst_tensor.nbytes)], dst_agent, 0, b"")
    deadline = time.monotonic() + 20
    while (state := xfer.state()) == "PROC" and time.monotonic() < deadline:
        time.sleep(0.005)
    xfer.release()
    return state


def test_metadata_is_packed_once_and_again_after_a_registration() -> None:
    tag = uuid.uuid4().hex[:8]
    target, writer = KVAgent(f"target-{tag}"), KVAgent(f"writer-{tag}")
    try:
        kv, extra = torch.zeros(4096), torch.zeros(4096)
        source = torch.arange(4096, dtype=torch.float32)
        target.register([kv])
        writer.register([source])
        first = target.metadata()
        assert target.metadata() is first, "unchanged registrations should not be packed again"

        name = writer.add_remote(first)
        assert _write(writer, source, name, kv) == "DONE"
        assert torch.equal(kv, source)

        target.register_extra([extra])
        second = target.metadata()
        assert second != first, "a new registration must reach peers through new metadata"
        writer.forget_remote(name)
        name = writer.add_remote(second)
        assert _write(writer, source, name, extra) == "DONE"
        assert torch.equal(extra, source)
    finally:
        writer.close()
        target.close()


def test_write_outside_the_registered_memory_is_refused() -> None:
    """What a peer holding stale metadata meets: NIXL has no region for the address."""
    tag = uuid.uuid4().hex[:8]
    target, writer = KVAgent(f"target-{tag}"), KVAgent(f"writer-{tag}")
    try:
        kv, unregistered = torch.zeros(4096), torch.zeros(4096)
        source = torch.arange(4096, dtype=torch.float32)
        target.register([kv])
        writer.register([source])
        name = writer.add_remote(target.metadata())
        with pytest.raises(Exception) as err:
            _write(writer, source, name, unregistered)
        assert not isinstance(err.value, AssertionError)
    finally:
        writer.close()
        target.close()
