#!/bin/bash
# The down GEMM's own tile at batch 1 (TileConfig's down_ fields, PDLAUNCH_MOE_TILE), one call: the Qwen3-30B-A3B
# shape's batch-1 step (1k context) under the tile file's batch-1 entry and variants that change the down GEMM's
# launch alone (K = 768: six 128-wide steps; N = 2048) or narrow the gate/up GEMM (96 programs at block_n 64 for
# 8 experts x 768 columns: fewer than the H100's 132 SMs) with the down's launch kept, twice over in one process
# (moe_speed.py --variants), bf16 then block-FP8 experts with an fp8 KV cache; then the GPU tests of the down tile.
# Usage: bash benchmarks/moe_b1_down_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
tiles=("" down_block_n=128 down_block_n=32:down_swap_ab=0 down_block_k=256:down_num_stages=2 down_num_stages=4
       down_block_k=64:down_num_stages=6 down_num_warps=8
       block_n=32:swap_ab=0:num_stages=4:down_block_n=64:down_swap_ab=1)
fp8_tiles=("" down_block_n=64:down_num_stages=3 down_block_n=16 down_num_stages=6)
variants=(); fp8_variants=()
for pass in 1 2; do
    for t in "${tiles[@]}"; do variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
    for t in "${fp8_tiles[@]}"; do fp8_variants+=("PDLAUNCH_MOE_TILE=${t:+$t:max_tokens=1}"); done
done
TAIL=22 step moe-bf16 240 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 \
    --variants "${variants[@]}" --json "$out/moe-bf16.json"
TAIL=12 step moe-fp8 150 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --fp8-experts --fp8-attention \
    --kv-cache-dtype fp8 --variants "${fp8_variants[@]}" --json "$out/moe-fp8.json"
TAIL=4 step gpu-tests 150 $py -m pytest -q -m gpu tests/model/test_moe_gpu.py tests/model/test_triton_moe.py \
    tests/model/test_pdl.py -p no:cacheprovider
