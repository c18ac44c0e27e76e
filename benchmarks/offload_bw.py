"""KV offload bandwidth (device <-> pinned CPU tier) against the raw pinned-copy bandwidth, same run.

    python benchmarks/offload_bw.py [--json OUT.json] [--blocks 512] [--block-size 16] [--groups 2]

KV of a Llama-3-8B shape (32 layers, 8 KV heads, head_dim 128, bf16) split over `--groups`
KV-cache groups in the block-major layout, so one block of one group is layers/groups x 64 KiB
(block_size 16). Jobs go through pdlaunch.offload.transfer.CpuGpuTransfer exactly as the engine
issues them (one job moves every group; the last group starts at an unaligned block_indices
entry like a sliding-window tail). Cases: blocks in consecutive runs (coalesced copies) and
scattered blocks (one copy per block and group). GB/s = bytes moved / wall time from the first
submit until the last job completed (host-measured, jobs queued back to back). The ceiling is one
contiguous pinned host <-> device copy of the same byte count, timed with CUDA events.
Every round trip is checked bit-exact.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.append(str(Path(__file__).resolve().parents[1]))  # after PYTHONPATH: a tree put there wins
from pdlaunch.offload.transfer import CpuGpuTransfer  # noqa: E402
from pdlaunch.offload.transfer_spec import CPULoadStoreSpec, GPULoadStoreSpec  # noqa: E402

LAYERS, KV_HEADS, HEAD_DIM = 32, 8, 128


def pinned_copy_gbps(nbytes: int, repeat: int = 10) -> dict[str, float]:
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    dev = torch.randint(0, 255, (nbytes,), dtype=torch.uint8, device="cuda")
    out: dict[str, float] = {}
    for name, dst, src in (("d2h", host, dev), ("h2d", dev, host)):
        times = []
        for i in range(repeat + 2):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src, non_blocking=True)
            end.record()
            end.synchronize()
            if i >= 2:
                times.append(start.elapsed_time(end))
        out[f"pinned_{name}_gbps"] = nbytes / statistics.median(times) / 1e6
    return out


def run_jobs(transfer: CpuGpuTransfer, specs: list[Any], nbytes: int, job0: int) -> float:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, spec in enumerate(specs):
        if not transfer.transfer_async(job0 + i, spec):
            raise RuntimeError("transfer refused")
    transfer.wait_all()
    seconds = time.perf_counter() - t0
    results = transfer.get_finished()
    if len(results) != len(specs) or not all(r.success for r in results):
        raise RuntimeError(f"transfer failed: {[r.error for r in results if not r.success]}")
    if sum(r.num_bytes for r in results) != nbytes:
        raise RuntimeError("byte count mismatch")
    return nbytes / seconds / 1e9


def bench(blocks: int, block_size: int, groups: int, jobs: int, scattered: bool) -> dict[str, Any]:
    per_group = LAYERS // groups
    shape = (per_group, 2, block_size, KV_HEADS, HEAD_DIM)
    num_gpu = 2 * blocks
    gpu = [torch.randn(num_gpu, *shape, device="cuda").to(torch.bfloat16) for _ in range(groups)]
    dst = [torch.zeros_like(t) for t in gpu]
    cpu = [torch.zeros(blocks, *shape, dtype=torch.bfloat16, pin_memory=True) for _ in range(groups)]
    transfer = CpuGpuTransfer(gpu, cpu)
    rng = random.Random(0)
    per_job = blocks // jobs
    skip = per_job // 3 + 1  # the last group moves only the tail of each job, from an unaligned index
    store_specs, load_specs, moved = [], [], []
    src_pool = rng.sample(range(num_gpu), num_gpu) if scattered else list(range(num_gpu))
    dst_pool = rng.sample(range(num_gpu), num_gpu) if scattered else list(range(num_gpu))
    for j in range(jobs):
        cpu_ids = tuple(range(j * per_job, (j + 1) * per_job))
        sizes = tuple(per_job if g < groups - 1 else per_job - skip for g in range(groups))
        starts = tuple(0 if g < groups - 1 else skip for g in range(groups))
        src = [src_pool[j * per_job + starts[g]:(j + 1) * per_job] for g in range(groups)]
        dsts = [dst_pool[j * per_job + starts[g]:(j + 1) * per_job] for g in range(groups)]
        src_spec = GPULoadStoreSpec(tuple(b for s in src for b in s), sizes, starts)
        dst_spec = GPULoadStoreSpec(tuple(b for s in dsts for b in s), sizes, starts)
        store_specs.append((src_spec, CPULoadStoreSpec(cpu_ids)))
        load_specs.append((CPULoadStoreSpec(cpu_ids), dst_spec))
        moved.append((src, dsts))
    nbytes = sum(sum(spec[0].group_sizes) for spec in store_specs) * gpu[0][0].nbytes  # equal groups
    run_jobs(transfer, store_specs[:1], sum(store_specs[0][0].group_sizes) * gpu[0][0].nbytes, 10**6)  # warm-up
    store = run_jobs(transfer, store_specs, nbytes, 0)
    transfer.gpu_caches = dst
    load = run_jobs(transfer, load_specs, nbytes, 1000)
    for src, dsts in moved:
        for g in range(groups):
            landed = dst[g][torch.tensor(dsts[g], device="cuda")]
            if not torch.equal(landed, gpu[g][torch.tensor(src[g], device="cuda")]):
                raise RuntimeError("round trip is not bit-exact")
    transfer.shutdown()
    return {"case": "scattered" if scattered else "runs", "bytes": nbytes, "jobs": jobs,
            "block_bytes_per_group": gpu[0][0].nbytes, "store_gbps": store, "load_gbps": load, "bit_exact": True}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--blocks", type=int, default=512, help="CPU-tier blocks moved per direction")
    ap.add_argument("--block-size", type=int, default=16)
    ap.add_argument("--groups", type=int, default=2, help="KV-cache groups the 32 layers are split into")
    ap.add_argument("--jobs", type=int, default=16, help="transfer jobs (requests) the blocks are split into")
    ap.add_argument("--json", type=Path, help="write the results here too")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("offload_bw.py needs a CUDA device", file=sys.stderr)
        return 1
    rows = [bench(args.blocks, args.block_size, args.groups, args.jobs, s) for s in (False, True)]
    ceiling = pinned_copy_gbps(rows[0]["bytes"])
    report = {"device": torch.cuda.get_device_name(), **ceiling, "cases": rows}
    for r in rows:
        r["store_pct_of_pinned"] = 100 * r["store_gbps"] / ceiling["pinned_d2h_gbps"]
        r["load_pct_of_pinned"] = 100 * r["load_gbps"] / ceiling["pinned_h2d_gbps"]
    print(f"{report['device']}: pinned copy d2h {ceiling['pinned_d2h_gbps']:.1f} GB/s, "
          f"h2d {ceiling['pinned_h2d_gbps']:.1f} GB/s ({rows[0]['bytes'] / 2**30:.2f} GiB)")
    for r in rows:
        print(f"  {r['case']:9s} store {r['store_gbps']:6.1f} GB/s ({r['store_pct_of_pinned']:.0f}%)  "
              f"load {r['load_gbps']:6.1f} GB/s ({r['load_pct_of_pinned']:.0f}%)  "
              f"{r['block_bytes_per_group'] // 1024} KiB per block and group, bit-exact")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
