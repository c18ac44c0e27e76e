#!/bin/bash
# Batch-1 paged decode launches timed inside whole steps on one GPU, one call (same method as
# moe_b1_launch_round.sh): the Qwen3-30B-A3B shape's batch-1 step (1k context, 4 KV heads: choose_launch gives
# 128-token tiles in one-tile ranges, 8 ranges x 4 heads = 32 programs) under PDLAUNCH_DECODE_LAUNCH variants
# (model/triton_decode.py launch_override): shorter tiles (more, shorter chains of round trips), fewer stages,
# more or fewer warps, two-tile ranges; then the qkv GEMV's 8,512,4 again; twice over in one process, bf16.
# (Its 2026-11-27 run also timed a peeled first tile, PDLAUNCH_ATTN_PEEL, +0.73 ms a step: removed since;
# benchmarks/RESULTS.md.)
# Usage: bash benchmarks/moe_b1_attn_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
launches=("" tile=64:short_tiles=32 tile=32:short_tiles=64 tile=64:short_tiles=32:num_stages=1 num_warps=8
          tile=64:short_tiles=32:num_warps=2 short_tiles=0)
variants=()
for pass in 1 2; do
    for l in "${launches[@]}"; do
        variants+=("PDLAUNCH_GEMV_CONFIG=,PDLAUNCH_DECODE_LAUNCH=${l:+$l:max_seqs=1}")
    done
    variants+=("PDLAUNCH_DECODE_LAUNCH=,PDLAUNCH_GEMV_CONFIG=5120x2048=8,512,4")
done
TAIL=20 step attn-bf16 300 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 --variants "${variants[@]}" \
    --json "$out/attn-bf16.json"
$py - "$out/attn-bf16.json" <<'PY'
import json, sys
for cell in json.load(open(sys.argv[1]))["decode"]:
    print(f"{cell['step_ms']:.4f} ms  {cell['ratio']:.4f}x  {cell.get('variant')}")
PY
