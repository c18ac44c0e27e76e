#!/bin/bash
# Issue 27's "fp8 KV moves half the bytes per token at >= the bf16 GB/s" where transfers overlap, one call:
# `bench kv-transfer --concurrency K` (K requests started back to back on disjoint blocks; a row covers all K until
# the last ends, so a transfer's fixed host cost is shared), bf16 then fp8 KV, then bf16 again (the A/B's drift),
# 1k and 8k tokens, push on one GPU by default (DEVICES="--device cuda:0 --decode-device cuda:1 --mode pull" for
# two GPUs with NVLink). One JSON per dtype and K in OUT_DIR (shallow: a device call brings it back).
# Usage: bash benchmarks/kv_concurrency_round.sh OUT_DIR     (KS="1 4 8" by default)
source "$(dirname "$0")/steps.sh"
devices=(${DEVICES:---device cuda:0 --mode push})
for round in 1 2; do
    for dtype in auto fp8; do
        [ "$round" = 2 ] && [ "$dtype" = fp8 ] && continue  # bf16 again at the end
        name=$([ "$dtype" = auto ] && echo bf16 || echo fp8)
        for k in ${KS:-1 4 8}; do
            TAIL=6 step "kv-$name-k$k-r$round" 200 $py -m pdlaunch bench kv-transfer "${devices[@]}" \
                --num-tokens 1024 --num-tokens 8192 --iterations 9 --concurrency "$k" --kv-cache-dtype "$dtype" \
                --json "$out/kv-$name-k$k-r$round.json"
        done
    done
done
