#!/bin/bash
# Batch-1 MoE tiles timed inside whole decode steps (PDLAUNCH_MOE_TILE, model/moe/fused.py tile_override) on one
# GPU, one call: the Qwen3-30B-A3B shape's batch-1 step (bf16, 1k context) under the tile file's batch-1 entry and
# variants of it, twice over in one process (moe_speed.py --variants captures the decode graphs again under each),
# then the same for block-FP8 experts. A variant that wins in both passes is a candidate for the tile file
# (benchmarks/moe_kernels.py times tiles alone, outside the step's chain of dependent launches).
# Usage: bash benchmarks/moe_b1_tiles_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=("" block_n=32 block_n=32:num_stages=4 block_n=128 block_k=64:num_stages=4 num_warps=8 swap_ab=0)
variants=()
for pass in 1 2; do
    for t in "${tiles[@]}"; do variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
done
TAIL=16 step moe-bf16 300 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --variants "${variants[@]}" \
    --json "$out/moe-bf16.json"
TAIL=16 step moe-fp8 240 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --fp8-experts --fp8-attention \
    --kv-cache-dtype fp8 --variants "${variants[@]}" --json "$out/moe-fp8.json"
