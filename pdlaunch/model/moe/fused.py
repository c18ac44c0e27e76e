"""The expert computation of one MoE layer: `fused_moe(x, w13, w2, topk_weights, topk_ids)`.

Weights are stacked per layer: w13 [E_local, 2*I, H] (each expert's gate rows, then its up rows) and
w2 [E_local, H, I]; I is this rank's share of the expert width (tensor parallel) and E_local this
rank's experts, global ids `expert_start .. expert_start + E_local` (expert parallel). Tokens routed
to experts this rank does not hold contribute zero here; the caller's all-reduce adds the ranks up.
The result is this rank's partial sum [T, H] in x's dtype.

Backends (`backend()` picks one per call):
- `reference`: a loop over the experts with index ops, the transformers order of operations (CPU,
  float32 parity). It syncs with the host, so it never runs inside a CUDA graph.
- `grouped_mm`: the T*k (token, expert) assignments sorted by expert, `torch._grouped_mm` for gate+up,
  the fused SiLU-and-mul kernel, `torch._grouped_mm` for down, the routing weight applied to the result.
- `triton`: the assignments sorted and padded per expert into blocks of `block_m` rows
  (`align_to_blocks`), one Triton grouped GEMM for gate+up with SiLU-and-mul in its epilogue and one
  for down with the routing weight in its epilogue (model/moe/triton_moe.py).
Both fused backends size every buffer from T, k and E alone (no `.item()`, no host sync), so decode
steps capture into CUDA graphs, and combine the k results of each token with one sum over a
[T, k, H] view (no loop over experts). On CUDA the per-device file under model/moe/configs/ names
the faster backend and the Triton tiles per token count (benchmarks/moe_kernels.py measures them);
PDLAUNCH_MOE_BACKEND=reference|grouped_mm|triton forces one.

Quantised experts: `fused_moe` takes the stacked weights as they are stored. FP8 experts (128x128 block
scales, `scales=`) run in the Triton backend, whose kernels load one fp8 [block_n, block_k] tile of
w13[e] / w2[e] at a time and scale it into the activation dtype in registers, or, where the fp8 tile file
says `fp8_activations`, multiply it with fp8-quantized activations (model/moe/triton_moe.py); routing, the
sort, the padding and the combine do not change.
"""

from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from pdlaunch.errors import PdlaunchError
from pdlaunch.model.fused_ops import silu_and_mul
from pdlaunch.model.moe.layout import BACKENDS, Backend, TileConfig, combine, local_expert_ids, sort_assignments
from pdlaunch.model.overrides import field_override, with_fields
from pdlaunch.model.quant.fp8 import dequantize_stacked_blocks

CONFIG_DIR = Path(__file__).parent / "configs"


# Used where no per-device file exists: the tiles that won on an H200 (configs/NVIDIA_H200.json),
# where Triton beat torch._grouped_mm at every size from 1 to 16384 tokens.
DEFAULT_TILES = (TileConfig(256, "triton", 16, 64, 128, 4, 3), TileConfig(1024, "triton", 64, 128, 64, 8, 4),
                 TileConfig(1 << 30, "triton", 128, 128, 64, 8, 3))


def config_file(device_name: str, fp8: bool = False) -> Path:
    """The tile file of a device name as torch reports it, e.g. `NVIDIA H100 80GB HBM3` (`fp8`: the tiles
    of fp8 experts, `<device>_fp8.json`)."""
    return CONFIG_DIR / (device_name.replace(" ", "_").replace("/", "_") + ("_fp8" if fp8 else "") + ".json")


@lru_cache(maxsize=8)
def device_tiles(device_name: str, fp8: bool = False) -> tuple[TileConfig, ...]:
    """The tile configurations of a device, ascending by max_tokens (defaults without a file; fp8
    experts without a file of their own take the bf16 ones)."""
    path = config_file(device_name, fp8)
    if not path.is_file():
        return device_tiles(device_name) if fp8 else DEFAULT_TILES
    try:
        entries = json.loads(path.read_text())["entries"]
        tiles = tuple(sorted((TileConfig(**e) for e in entries), key=lambda t: t.max_tokens))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise PdlaunchError(f"MoE tile file {path} does not load: {exc}", field="model",
                            hint="restore the file from the repository or delete it to use defaults") from exc
    if not tiles or any(t.backend not in BACKENDS for t in tiles):
        raise PdlaunchError(f"MoE tile file {path} names no entry or an unknown backend", field="model",
                            hint=f"backends: {', '.join(BACKENDS)}")
    return tiles


def tile_for(x: torch.Tensor, num_tokens: int, fp8: bool = False) -> TileConfig:
    """The entry for a call of `num_tokens` tokens on x's device (the largest covers the rest), with
    PDLAUNCH_MOE_TILE's fields in place of its own for calls it covers (tile_override)."""
    tiles = device_tiles(torch.cuda.get_device_name(x.device), fp8) if x.is_cuda else DEFAULT_TILES
    tile = next((t for t in tiles if num_tokens <= t.max_tokens), tiles[-1])
    return with_fields(tile, tile_override(os.environ.get("PDLAUNCH_MOE_TILE", "")), num_tokens, "max_tokens")


_OVERRIDABLE = {"block_m": int, "block_n": int, "block_k": int, "num_warps": int, "num_stages": int,
                "swap_ab": bool, "f16_products": bool, "fp8_activations": bool, "max_tokens": int,
                "down_block_n": int, "down_block_k": int, "down_num_warps": int, "down_num_stages": int,
                "down_swap_ab": bool}


@lru_cache(maxsize=8)
def tile_override(setting: str) -> dict[str, int | bool]:
    """PDLAUNCH_MOE_TILE, `field=value:field=value` (e.g. `block_n=32:num_stages=4:max_tokens=1`): TileConfig
    fields that replace the tile file's for every call of at most `max_tokens` tokens (default: every call), so
    a benchmark can time a tile inside whole steps before it goes into a file (moe_speed.py --variants); the
    down_ fields set the down GEMM's launch apart (TileConfig.down). Block sizes and warps are powers of two;
    booleans 0 or 1."""
    return field_override("PDLAUNCH_MOE_TILE", setting, _OVERRIDABLE,
                          frozenset({"block_m", "block_n", "block_k", "num_warps", "down_block_n", "down_block_k",
                                     "down_num_warps"}), "tile",
                          "block_n=32:max_tokens=1")


def backend(x: torch.Tensor, num_tokens: int) -> Backend:
    """Which backend runs a call: PDLAUNCH_MOE_BACKEND, else the reference off CUDA and the tile file's
    choice on CUDA (grouped_mm needs bf16; other dtypes take triton)."""
    forced = os.environ.get("PDLAUNCH_MOE_BACKEND", "auto")
    if forced != "auto":
        if forced not in BACKENDS:
            raise PdlaunchError(f"PDLAUNCH_MOE_BACKEND={forced!r} is not a backend", field="PDLAUNCH_MOE_BACKEND",
                                hint=f"use auto, {', '.join(BACKENDS)}")
        return forced
    if not x.is_cuda:
        return "reference"
    chosen = tile_for(x, num_tokens).backend
    if chosen == "grouped_mm" and x.dtype != torch.bfloat16:
        return "triton"
    return chosen


def fused_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor, expert_start: int = 0, use: Backend | None = None,
              tile: TileConfig | None = None,
              scales: tuple[torch.Tensor, torch.Tensor] | None = None, num_experts: int | None = None,
              summed: bool = True) -> torch.Tensor:
    """x [T, H], w13 [E_local, 2I, H], w2 [E_local, H, I], topk_weights [T, k] (float32), topk_ids [T, k]
    (global expert ids) -> this rank's sum over its experts of weight * down(silu(gate) * up): [T, H].
    `use` / `tile` override the backend and the Triton tile (benchmarks, tests). `scales`: w13 and w2 are
    fp8 with 128x128 block scales (FusedExperts.to_fp8_blocks); the Triton backend reads them as they are
    (grouped_mm has no such path and gives way to it), the reference dequantizes first. `num_experts`: the
    model's expert count (lets the Triton backend skip zeroing rows when this rank holds every expert). `summed`
    False lets the Triton backend return each token's k weighted rows [T, k, H] unsummed, for a consumer that adds
    them itself (fused_ops.fused_add_rms_norm); the other backends always return [T, H]."""
    chosen = use or (tile.backend if tile is not None else backend(x, x.shape[0]))
    if scales is not None and chosen == "grouped_mm":
        chosen = "triton"
    if chosen == "reference":
        if scales is not None:
            w13 = dequantize_stacked_blocks(w13, scales[0]).to(x.dtype)
            w2 = dequantize_stacked_blocks(w2, scales[1]).to(x.dtype)
        return moe_reference(x, w13, w2, topk_weights, topk_ids, expert_start)
    if chosen == "grouped_mm":
        local = local_expert_ids(topk_ids, expert_start, w13.shape[0])
        # Assignments to other ranks' experts go to bucket E_local, which no GEMM reads.
        weights = torch.where(local < w13.shape[0], topk_weights.float(), 0.0)
        return _grouped_mm_moe(x, w13, w2, weights, local)
    from pdlaunch.model.moe.triton_moe import triton_moe  # layering: lazy

    return triton_moe(x, w13, w2, topk_weights, topk_ids, expert_start,
                      tile or tile_for(x, x.shape[0], scales is not None), scales, num_experts, summed)


def moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor, expert_start: int = 0) -> torch.Tensor:
    """Per expert, in ascending order as transformers does: the tokens routed to it, gate+up, SiLU-and-mul,
    down, times their routing weight (in x's dtype), added into the output."""
    out = torch.zeros_like(x)
    inter = w2.shape[2]
    for e in range(w13.shape[0]):
        token, slot = torch.where(topk_ids == expert_start + e)
        if token.numel() == 0:
            continue
        gate_up = F.linear(x[token], w13[e])
        h = F.linear(F.silu(gate_up[:, :inter]) * gate_up[:, inter:], w2[e])
        out.index_add_(0, token, h * topk_weights[token, slot, None].to(x.dtype))
    return out


def _grouped_mm_moe(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, weights: torch.Tensor,
                    local: torch.Tensor) -> torch.Tensor:
    num_tokens, top_k = local.shape
    num_local = w13.shape[0]
    s = sort_assignments(local, num_local)
    offs = torch.cumsum(s.counts[:num_local], 0).to(torch.int32)  # end row of each expert
    rows = x[s.order // top_k]
    gate_up = torch._grouped_mm(rows, w13.transpose(1, 2), offs=offs)
    down = torch._grouped_mm(silu_and_mul(gate_up), w2.transpose(1, 2), offs=offs)
    # Rows past the last expert's end (dropped assignments) are not written by the GEMM: mask, not multiply.
    w = weights.reshape(-1)[s.order]
    down = torch.where((s.expert < num_local).unsqueeze(1), down.float() * w.unsqueeze(1), 0.0).to(x.dtype)
    return combine(down, s.order, num_tokens, top_k)
