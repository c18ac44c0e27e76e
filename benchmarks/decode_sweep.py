"""Launch configurations of the paged decode kernel, timed on a few cells (decode_grid.py --sweep).

For each cell and each (tile, num_warps, num_stages, waves) the kernel's KV bandwidth is timed
(one layer, CUDA events), each configuration's output checked against float64 attention once;
the best per cell is printed. `choose_launch` in pdlaunch/model/decode_launch.py is set from this.
"""

from __future__ import annotations

import itertools
from typing import Any

from pdlaunch.model.decode_launch import MIN_SPLIT_TOKENS, DecodeLaunch, choose_launch
from pdlaunch.model.triton_decode import paged_decode

CELLS = [(48, 3072), (64, 1024), (1, 8000), (128, 1024), (8, 16384), (64, 128)]
TILES = [32, 64, 128]
WARPS_STAGES = [(4, 1), (4, 2), (4, 3), (8, 2), (8, 3)]
WAVES = [1, 2, 4]
MIN_TOKENS = [64, 128, 256, 512]  # shortest context range, varied where the programs are few


def sweep(bench: Any, copy_bps: float, cells: list[tuple[int, int]] | None = None) -> list[dict[str, Any]]:
    """bench: decode_grid.KernelBench. Returns every timing, fastest first per cell."""
    results: list[dict[str, Any]] = []
    errors: dict[tuple[int, int, int], float] = {}
    for batch, context in cells or CELLS:
        rows = []
        few = batch * bench.num_kv_heads < 132
        tiles = TILES + [256] if bench.cache.element_size() == 1 else TILES  # fp8: 256 tokens = 32 KiB of K
        for tile, (warps, stages), waves, min_tokens in itertools.product(
                tiles, WARPS_STAGES, WAVES, MIN_TOKENS if few else [MIN_SPLIT_TOKENS]):
            if min_tokens < tile:
                continue
            splits = choose_launch(batch, bench.num_kv_heads, bench.head_dim, 132, waves).splits
            launch = DecodeLaunch(tile, splits, max(1, min_tokens // tile), warps, stages)
            key = (tile, warps, stages)
            if key not in errors:
                errors[key] = bench.check(4, 3000, DecodeLaunch(tile, 4, 1, warps, stages))
            ms = bench.time(paged_decode, batch, context, launch=launch)
            gbps = bench.kv_bytes(batch, context) / ms / 1e6
            rows.append({"batch": batch, "context": context, "tile": tile, "num_warps": warps, "num_stages": stages,
                         "waves": waves, "splits": splits, "min_tokens": min_tokens, "us": ms * 1e3, "gbps": gbps,
                         "of_copy": gbps * 1e9 / copy_bps,
                         "rel_err": errors[key]})
        rows.sort(key=lambda r: r["us"])
        results.extend(rows)
        top = ", ".join(f"t{r['tile']} w{r['num_warps']} s{r['num_stages']} x{r['waves']} m{r['min_tokens']}: "
                        f"{r['gbps']:.0f}"
                        for r in rows[:4])
        print(f"sweep {batch} x {context}: {top} GB/s (slowest {rows[-1]['gbps']:.0f})", flush=True)
    bad = {k: e for k, e in errors.items() if not e < 2e-2}
    if bad:
        raise RuntimeError(f"launch configurations with wrong output: {bad}")
    return results
