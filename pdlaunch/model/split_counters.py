"""What kernels whose programs split one output need per device (paged decode's context ranges, the block-FP8
GEMM's K ranges): the SM count their splits are sized by, and int32 counters by which the last program to finish
finds out that it combines the parts.

Every launch leaves the counters it used at zero (the combining program resets its own), so one buffer per
device serves every such kernel: launches on one device never overlap, as each server process runs one
engine and an engine one step at a time on one stream. It is allocated once (the engine's warm-up runs before
any CUDA graph capture does it), never inside a capture, whose replays would keep reusing it.
"""

from __future__ import annotations

from functools import cache

import torch

_COUNTERS: dict[torch.device, torch.Tensor] = {}
MIN_COUNTERS = 4096


@cache
def num_sms(device_index: int) -> int:
    """Streaming multiprocessors of CUDA device `device_index`."""
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_counters(device: torch.device, needed: int) -> torch.Tensor:
    """At least `needed` zeroed int32 counters on `device`, the same buffer on every call while it is big
    enough."""
    counters = _COUNTERS.get(device)
    if counters is None or counters.numel() < needed:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"a split kernel needs {needed} counters during a CUDA graph capture; "
                               "run the same shapes once before capturing them")
        counters = torch.zeros(max(needed, MIN_COUNTERS), dtype=torch.int32, device=device)
        _COUNTERS[device] = counters
    return counters


def leftover(device: torch.device) -> bool:
    """Whether a counter on `device` was left non-zero (a combining program did not run: tests)."""
    counters = _COUNTERS.get(device)
    return counters is not None and bool(counters.any())
