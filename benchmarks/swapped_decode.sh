#!/bin/bash
# The paged decode with its products transposed (DecodeLaunch.swapped: the tile's tokens the MMA's M side, Hopper's
# warpgroup MMA) against the chosen launch, in one call on one GPU: the kernel alone (decode_gqa.py --swapped) for
# fp8 and bf16 caches at 8 and 4 KV heads, the decode kernel's GPU tests with every launch swapped, then 8B-shape
# decode steps with PDLAUNCH_DECODE_SWAPPED=1 against the chosen launches, fp8 and bf16 caches.
# Usage: bash benchmarks/swapped_decode.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=14 step gqa-fp8-8kv 90 $py benchmarks/decode_gqa.py --kv-heads 8 --kv-cache-dtype fp8 --swapped \
    --cells 48x3072 64x1024 128x512 1x8000 1x1024 --json "$out/gqa-fp8-8kv.json"
TAIL=12 step gqa-fp8-4kv 90 $py benchmarks/decode_gqa.py --kv-heads 4 --kv-cache-dtype fp8 --swapped \
    --cells 64x1024 128x1024 256x1024 1x1024 --json "$out/gqa-fp8-4kv.json"
TAIL=14 step gqa-bf16-8kv 90 $py benchmarks/decode_gqa.py --kv-heads 8 --swapped \
    --cells 48x3072 64x1024 128x512 1x8000 1x128 --json "$out/gqa-bf16-8kv.json"
TAIL=12 step gqa-bf16-4kv 90 $py benchmarks/decode_gqa.py --kv-heads 4 --swapped \
    --cells 64x1024 256x1024 1x1024 --json "$out/gqa-bf16-4kv.json"
PDLAUNCH_DECODE_SWAPPED=1 TAIL=4 step gpu-tests-swapped 120 $py -m pytest -q -p no:cacheprovider -m gpu \
    tests/model/test_triton_decode.py
[ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
for kv in fp8 auto; do
    for swapped in 0 1; do
        PDLAUNCH_DECODE_SWAPPED=$swapped TAIL=8 step grid-$kv-$swapped 80 $py benchmarks/decode_grid.py /tmp/l8b \
            --batch 64 --context 1024 --cells 48x3072 128x512 1x8000 --steps 32 --kv-cache-dtype $kv \
            --json "$out/grid-$kv-$swapped.json"
    done
done
