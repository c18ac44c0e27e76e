#!/bin/bash
# Round two of moe_b1_launch_round.sh (same method, one call): batch-1 MoE tile variants the first round did not
# try (stages, block_k, swapped operands off with narrow tiles), bf16; the block-FP8 batch-1 entry the first round
# chose (block_n 32, 4 stages) against the one it replaced and two neighbours; the qkv (5120 x 2048) and o
# (2048 x 4096) GEMV launches (the first round's list failed: --variants split values at their commas).
# Usage: bash benchmarks/moe_b1_launch_round2.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=("" num_stages=4 num_stages=2 block_k=256:num_stages=2 block_k=64 swap_ab=0:block_n=32:num_stages=4 num_warps=2)
fp8_tiles=("" block_n=64:num_stages=3 block_n=16:num_stages=4 block_n=32:num_stages=5)
gemvs=("" 5120x2048=4,512,4 5120x2048=16,512,8 5120x2048=8,512,4 2048x4096=4,512,4 2048x4096=4,1024,8
       2048x4096=8,2048,8)
variants=(); fp8_variants=(); gemv_variants=()
for pass in 1 2; do
    for t in "${tiles[@]}"; do variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
    for t in "${fp8_tiles[@]}"; do fp8_variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
    for g in "${gemvs[@]}"; do gemv_variants+=("PDLAUNCH_MOE_TILE=,PDLAUNCH_GEMV_CONFIG=$g"); done
done
TAIL=16 step moe-bf16 240 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 \
    --variants "${variants[@]}" "${gemv_variants[@]}" --json "$out/moe-bf16.json"
TAIL=10 step moe-fp8 200 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --fp8-experts --fp8-attention \
    --kv-cache-dtype fp8 --variants "${fp8_variants[@]}" --json "$out/moe-fp8.json"
