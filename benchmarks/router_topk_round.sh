#!/bin/bash
# The MoE router's product and top-k in one launch (model/moe/router.py route_tokens) against two launches, in one
# call on one GPU: the router's and the dependent-launch GPU tests, then Qwen3-30B-A3B-shape batch-1 decode steps
# (moe_speed.py) with PDLAUNCH_ROUTER_TOPK=separate (two launches), fused (one, 4 warps) and fused1 (one, 1 warp),
# alternating twice.
# Usage: bash benchmarks/router_topk_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=3 step gpu-tests 90 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_moe_router.py \
    tests/model/test_pdl.py
for run in 1 2; do
    for mode in separate fused fused1; do
        PDLAUNCH_ROUTER_TOPK=$mode TAIL=1 step "moe-b1-$mode-$run" 60 $py benchmarks/moe_speed.py --batch 1 \
            --prefill 0 --steps 60 --json "$out/moe-b1-$mode-$run.json"
    done
done
