#!/bin/bash
# A batch-1 paged decode that lets the o projection start right after its wait (triton_decode.attention_early) on
# one GPU, one call: the 8B shape's 1 x 128 and 1 x 8000 cells with PDLAUNCH_ATTN_EARLY off and on in processes of
# their own, alternating; the Qwen3-30B-A3B shape's batch-1 decode step (bf16, 1k context) off and on alternating
# in one process (moe_speed.py --variants captures the decode graphs again under each); then the batch-1 chain's
# GPU tests and the GPU suites outside tests/model and tests/quant.
# Usage: bash benchmarks/attn_early_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
for m in off on off on; do
    PDLAUNCH_ATTN_EARLY=$m TAIL=3 step "grid-8b-$m" 90 $py benchmarks/decode_grid.py /tmp/l8b --batch 1 \
        --context 128 --cells 1x8000 --steps 32 --json "$out/grid-8b-$m-$SECONDS.json"
done
TAIL=7 step moe-bf16 200 $py benchmarks/moe_speed.py --batch 1 --steps 60 --prefill 0 \
    --variants PDLAUNCH_ATTN_EARLY=off PDLAUNCH_ATTN_EARLY=on PDLAUNCH_ATTN_EARLY=off PDLAUNCH_ATTN_EARLY=on \
    PDLAUNCH_ATTN_EARLY=off PDLAUNCH_ATTN_EARLY=on --json "$out/moe-bf16.json"
TAIL=3 step gpu-tests-pdl 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_pdl.py
TAIL=4 step gpu-tests-rest 240 $py -m pytest -q -p no:cacheprovider -m gpu tests --ignore=tests/model \
    --ignore=tests/quant
