#!/bin/bash
# Issues 29 and 27 on one GPU, in one call (each step bounded so the call ends inside 10 minutes):
# the 8B-shape decode grid with async scheduling off, then on; the 48 x 3072 cell with an fp8 KV cache;
# `bench kv-transfer` pull and push at 1k / 8k tokens with a bf16 and an fp8 cache.
# Usage: bash benchmarks/round3_grid.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
cells=(--batch 48 --context 3072 --cells 64x1024 1x8000 128x512 1x128 --steps 32)
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
step grid-sync 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --no-async-scheduling --json "$out/grid-sync.json"
step grid-async 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/grid-async.json"
TAIL=4 step grid-fp8kv 90 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 --steps 32 \
    --kv-cache-dtype fp8 --json "$out/grid-fp8kv.json"
kv=(--device cuda --num-tokens 1024 --num-tokens 8192 --mode pull --mode push --iterations 15)
TAIL=8 step kv-bf16 60 $py -m pdlaunch bench kv-transfer "${kv[@]}" --json "$out/kv-bf16.json"
TAIL=8 step kv-fp8 60 $py -m pdlaunch bench kv-transfer "${kv[@]}" --kv-cache-dtype fp8 --json "$out/kv-fp8.json"
