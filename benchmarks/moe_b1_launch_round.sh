#!/bin/bash
# Batch-1 launches timed inside whole decode steps on one GPU, one call: the Qwen3-30B-A3B shape's batch-1 step
# (1k context) under the tile file's batch-1 MoE entry and variants of it (PDLAUNCH_MOE_TILE, model/moe/fused.py
# tile_override), twice over in one process (moe_speed.py --variants captures the decode graphs again under each),
# bf16 then block-FP8 experts; then the qkv (5120 x 2048) and o (2048 x 4096) projections' GEMV launches
# (PDLAUNCH_GEMV_CONFIG, model/gemv.py config_override) likewise, bf16. A variant that wins in both passes is a
# candidate for the tile file or GEMV_DEVICE_CONFIGS (benchmarks/moe_kernels.py and gemv_speed.py time launches
# alone, outside the step's chain of dependent launches).
# Usage: bash benchmarks/moe_b1_launch_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=("" block_n=32 block_n=32:num_stages=4 block_n=128 block_k=64:num_stages=4 num_warps=8 swap_ab=0)
gemvs=("" 5120x2048=4,512,4 5120x2048=16,512,8 2048x4096=4,512,4 2048x4096=4,1024,8 2048x4096=16,512,8)
variants=()
gemv_variants=()
for pass in 1 2; do
    for t in "${tiles[@]}"; do variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
    for g in "${gemvs[@]}"; do gemv_variants+=("PDLAUNCH_GEMV_CONFIG=$g"); done
done
TAIL=16 step moe-bf16 300 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --variants "${variants[@]}" \
    --json "$out/moe-bf16.json"
TAIL=16 step moe-fp8 240 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --fp8-experts --fp8-attention \
    --kv-cache-dtype fp8 --variants "${variants[@]}" --json "$out/moe-fp8.json"
TAIL=14 step gemv-bf16 240 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 \
    --variants "${gemv_variants[@]}" --json "$out/gemv-bf16.json"
