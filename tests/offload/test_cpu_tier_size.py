"""A CPU offload tier that cannot be allocated is refused naming --kv-offload-gb, not with torch's allocator error."""

from __future__ import annotations

import pytest
import torch

from pdlaunch.errors import EngineError
from pdlaunch.offload import cpu_tier
from pdlaunch.offload.cpu_tier import CPUTier

SHAPE = (1, 2, 4, 1, 2)  # one device block: [layers, 2, block_size, kv_heads, head_dim]
PIB_OF_BLOCKS = 2**50 // CPUTier.bytes_per_block([SHAPE], torch.float32)  # 1 PiB: past any host and address space


def test_tier_larger_than_host_ram_names_the_flag() -> None:
    with pytest.raises(EngineError) as err:
        CPUTier(PIB_OF_BLOCKS, [SHAPE], torch.float32, pin_memory=False)
    assert err.value.field == "cache.kv_offload_gb"
    assert "1048576.0 GiB" in err.value.message and "GiB of RAM" in err.value.message
    assert "--kv-offload-gb" in (err.value.hint or "")


def test_tier_the_allocator_refuses_names_the_flag(monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the RAM check (pinned memory has lower limits than RAM): torch's refusal becomes ours."""
    monkeypatch.setattr(cpu_tier, "host_memory_bytes", lambda: 2**60)
    with pytest.raises(EngineError) as err:
        CPUTier(PIB_OF_BLOCKS, [SHAPE], torch.float32, pin_memory=False)
    assert err.value.field == "cache.kv_offload_gb"
    assert "could not be allocated" in err.value.message and "--kv-offload-gb" in (err.value.hint or "")
