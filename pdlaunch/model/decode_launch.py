"""How one paged decode call is cut (`DecodeLaunch`): tokens per loop iteration, context splits, Triton knobs,
chosen from the batch, head counts, cache element size and device only (`choose_launch`), so a CUDA graph captured
for a batch serves every context; PDLAUNCH_DECODE_LAUNCH's fields in their place for a benchmark
(`with_override`); the batch sizes that give every launch once (`launch_batch_sizes`, the warm-up's); and how many
of a prompt's rows one program computes (`rows_per_program`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

import torch

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.overrides import field_override, with_fields
from pdlaunch.model.split_counters import num_sms as _num_sms  # tests patch decode_launch._num_sms

MAX_SPLITS = 64
MIN_SPLIT_TOKENS = 256  # shorter ranges cost more in partials and merging than they gain ...
# ... except in contexts of up to this many tokens, where one-tile ranges win: batch 1, 1024 tokens, one H100, 4 and
# 8 KV heads, 8.98 -> 7.30 and 10.06 -> 7.94 us a call; 2048 tokens, 4 KV heads, 9.68 -> 9.01; at 4096 they lose,
# 12.62 -> 14.34 (benchmarks/RESULTS.md)
SHORT_SPLIT_CONTEXT = 2048


# Programs of one launch over an fp8 cache resident on an SM at once, by tile (head_dim 128, 4 warps, 2 stages):
# the waves the timings of benchmarks/fp8_decode_tiles.py step by on Hopper (132 SMs).
FP8_RESIDENT = {64: 4, 128: 3}


def _wave_fill(programs: int, slots: int) -> float:
    """The share of the SM slots that `programs` keep busy over the waves they take."""
    return programs / (-(-programs // slots) * slots)


@dataclass(frozen=True)
class DecodeLaunch:
    """How one paged_decode call is cut: tokens per loop iteration, context ranges, Triton knobs. A context of
    at most `short_tiles` tiles splits into ranges of one tile, a longer one into ranges of `min_tiles` or more."""

    tile: int
    splits: int
    min_tiles: int
    num_warps: int
    num_stages: int
    short_tiles: int = 0


def choose_launch(num_seqs: int, num_kv_heads: int, head_dim: int, num_sms: int, waves: int = 2,
                  element_size: int = 2) -> DecodeLaunch:
    """Splits: enough (sequence, KV head, range) programs for `waves` programs per SM, a power of
    two <= MAX_SPLITS; each range at least MIN_SPLIT_TOKENS long. Depends on the batch, head
    counts, cache element size and device only, so a CUDA graph captured for this batch serves
    every context."""
    programs = max(1, num_seqs * num_kv_heads)
    # Measured on an H100 (benchmarks/decode_sweep.py): 64-token tiles, two stages, when the
    # programs fill the SMs twice; with fewer, each streams more at once: 128-token tiles
    # (1 x 8000: 2570 GB/s against 1860 with 64, timed with that context in L2; read from memory, every
    # tile and split takes 21-23 us there: a fixed ~7 us a call plus 80% of copy bandwidth). A 1-byte
    # (fp8) cache moves half the bytes per token: twice the tokens per tile keep the bytes per loop
    # iteration (up to 128 tokens of 128).
    tile = (64 if head_dim <= 128 else 32) * (2 if programs < 2 * num_sms else 1)
    if element_size == 1:
        wide = max(tile, min(2 * tile, 128 * 128 // max(head_dim, 128)))
        # Except where the programs fill the SMs' slots for 64-token tiles in fewer, fuller waves than for
        # 128-token ones (FP8_RESIDENT): e.g. 512 programs on 132 SMs are 1.3 waves of the 128-token tile but
        # one of the 64-token one, which was 17-19% faster at 64 x 1024-3072 (8 KV heads) and 128 x 1024-4096
        # (4 KV heads) on an H200 and an H100; at 384, 640 and 768 programs the 128-token tile stays faster
        # (benchmarks/fp8_decode_tiles.py, benchmarks/RESULTS.md).
        narrow_wins = (head_dim == 128 and wide == 2 * tile
                       and _wave_fill(programs, FP8_RESIDENT[tile] * num_sms)
                       > _wave_fill(programs, FP8_RESIDENT[wide] * num_sms))
        tile = tile if narrow_wins else wide
    # Programs that fill every SM once run unsplit: Qwen3-30B-A3B's 64 x 1024 (256 programs, 4 KV heads) streamed
    # 3637 GB/s in one range of 128-token tiles against 2971 in two of 64 on an H200 (benchmarks/decode_gqa.py).
    wanted = -(-waves * num_sms // programs) if programs < num_sms else 1
    splits = min(MAX_SPLITS, 1 << (wanted - 1).bit_length()) if wanted > 1 else 1
    return DecodeLaunch(tile=tile, splits=splits, min_tiles=max(1, MIN_SPLIT_TOKENS // tile),
                        num_warps=4, num_stages=2, short_tiles=SHORT_SPLIT_CONTEXT // tile if splits > 1 else 0)


_LAUNCH_FIELDS = {"tile": int, "splits": int, "min_tiles": int, "num_warps": int, "num_stages": int,
                  "short_tiles": int, "max_seqs": int}


@lru_cache(maxsize=8)
def launch_override(setting: str) -> dict[str, int | bool]:
    """PDLAUNCH_DECODE_LAUNCH, `field=value:field=value` (e.g. `tile=64:max_seqs=1`): DecodeLaunch fields that
    replace choose_launch's for every call of at most `max_seqs` sequences (default: every call), so a benchmark
    can time a launch inside whole steps (moe_speed.py --variants). tile (16 to 256), splits (up to MAX_SPLITS)
    and warps are powers of two; short_tiles may be 0 (no short contexts split into one-tile ranges)."""
    fields = field_override("PDLAUNCH_DECODE_LAUNCH", setting, _LAUNCH_FIELDS,
                            frozenset({"tile", "splits", "num_warps"}), "launch", "tile=64:max_seqs=1",
                            zero_ok=frozenset({"short_tiles"}))
    if not 16 <= int(fields.get("tile", 16)) <= 256 or int(fields.get("splits", 1)) > MAX_SPLITS:
        raise PdlaunchError(f"PDLAUNCH_DECODE_LAUNCH: {setting!r}: tile must be 16 to 256 and splits at most "
                            f"{MAX_SPLITS}", field="PDLAUNCH_DECODE_LAUNCH", hint="e.g. tile=64:max_seqs=1")
    return fields


def with_override(launch: DecodeLaunch, num_seqs: int) -> DecodeLaunch:
    """`launch` with PDLAUNCH_DECODE_LAUNCH's fields in place of its own when the call has at most its
    max_seqs sequences (launch_override)."""
    return with_fields(launch, launch_override(os.environ.get("PDLAUNCH_DECODE_LAUNCH", "")), num_seqs, "max_seqs")


def launch_batch_sizes(max_num_seqs: int, num_kv_heads: int, head_dim: int, device: torch.device,
                       element_size: int = 2) -> list[int]:
    """The smallest batch size of each distinct launch `choose_launch` gives for 1..max_num_seqs
    sequences: running these once compiles every variant an eager decode of up to max_num_seqs launches."""
    sms = _num_sms(device.index or 0) if device.type == "cuda" else 16
    seen: dict[DecodeLaunch, int] = {}
    for n in range(1, max_num_seqs + 1):
        seen.setdefault(choose_launch(n, num_kv_heads, head_dim, sms, element_size=element_size), n)
    return sorted(seen.values())


def rows_per_program(num_heads: int, num_kv_heads: int) -> int:
    """How many query rows of one sequence a program of `paged_decode` with `leads` computes together: as many
    as fill the 16 rows the tensor-core product pads a GQA group to (8B's group of 4: 4 rows), so a decode
    row's program does the same work as without leads."""
    group = num_heads // num_kv_heads
    return max(1, 16 // group) if group <= 16 else 1
