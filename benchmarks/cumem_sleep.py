"""Sleep/wake cost of the CuMem pools: N GiB of "weights" and M GiB of "kv_cache", timed through the
MemorySleep (the engine's path), with the fraction of pool memory the GPU really gets back.

    python benchmarks/cumem_sleep.py --weights-gib 16 --kv-gib 40 --cycles 5 [--json out.json]

Level 1 copies weights to pinned CPU memory and restores them; level 2 discards both (the weight
reload from a checkpoint is the engine's and is not timed here). Needs a CUDA GPU and cuda-bindings.
argparse rather than typer: it runs on bare GPU images that have torch but not the CLI stack.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from pdlaunch.memory.cumem import CuMemAllocator
from pdlaunch.memory.sleep import MemorySleep

GiB = 1 << 30
CHUNK = 256 << 20  # bytes per weight tensor, about a large layer's matrix


def _free() -> int:
    torch.cuda.synchronize()
    return torch.cuda.mem_get_info()[0]


def _checksums(tensors: list[torch.Tensor]) -> list[int]:
    # Integer sums of the raw bits: exact, so any corrupted byte pattern is caught.
    return [int(t.view(torch.int32).sum(dtype=torch.int64)) for t in tensors]


def run(weights_gib: float, kv_gib: float, cycles: int) -> dict[str, object]:
    allocator = CuMemAllocator.get_instance()
    with allocator.use_memory_pool("weights"):
        weights = [torch.randn(CHUNK // 2, dtype=torch.bfloat16, device="cuda")
                   for _ in range(max(1, int(weights_gib * GiB) // CHUNK))]
    with allocator.use_memory_pool("kv_cache"):
        kv_cache = torch.zeros(int(kv_gib * GiB), dtype=torch.uint8, device="cuda")
    expected = _checksums(weights)
    pointers = [t.data_ptr() for t in weights] + [kv_cache.data_ptr()]
    pool_bytes = allocator.get_current_usage()
    controller = MemorySleep(allocator, reload_weights=lambda: None)

    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(),
        "pool_gib": round(pool_bytes / GiB, 3),
        "weights_gib": round(sum(t.nbytes for t in weights) / GiB, 3),
        "kv_cache_gib": round(kv_cache.nbytes / GiB, 3),
        "granularity_bytes": allocator.granularity(),
        "gpudirect_rdma_capable": allocator.rdma_capable(),
    }
    for level in (1, 2):
        sleep_ms, wake_ms, freed_fraction, awake_free = [], [], [], []
        for _ in range(cycles):
            before = _free()
            start = time.perf_counter()
            controller.sleep(level)
            sleep_ms.append((time.perf_counter() - start) * 1e3)
            freed_fraction.append((_free() - before) / pool_bytes)
            start = time.perf_counter()
            controller.wake_up()
            torch.cuda.synchronize()
            wake_ms.append((time.perf_counter() - start) * 1e3)
            awake_free.append(_free())
        intact = [t.data_ptr() for t in weights] + [kv_cache.data_ptr()] == pointers
        if level == 1:
            intact = intact and _checksums(weights) == expected
        results[f"level{level}"] = {
            "sleep_ms_median": round(statistics.median(sleep_ms), 1),
            "sleep_ms_first": round(sleep_ms[0], 1),
            "wake_ms_median": round(statistics.median(wake_ms), 1),
            "freed_fraction_min": round(min(freed_fraction), 4),
            "awake_free_growth_mib": round((max(awake_free) - min(awake_free)) / (1 << 20), 1),
            "same_pointers_and_data": intact,
        }
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights-gib", type=float, default=4.0, help="GiB of weights (backed up at level 1)")
    parser.add_argument("--kv-gib", type=float, default=8.0, help="GiB of KV cache (always discarded)")
    parser.add_argument("--cycles", type=int, default=5, help="sleep/wake cycles per level")
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args()
    results = run(args.weights_gib, args.kv_gib, args.cycles)
    text = json.dumps(results, indent=2)
    print(text)
    if args.json:
        with open(args.json, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
