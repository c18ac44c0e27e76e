#!/bin/bash
# Issue 27 on one GPU, in one call (each step bounded): the FP8 GPU tests, the weight-only decode kernel's
# config sweep and the projection GEMMs (benchmarks/fp8_bench.py), the 8B-shape decode step of a 128x128-block
# FP8 checkpoint at batch 1 and 1 x 8000, then the fp8 KV cache's 48 x 3072 and 64 x 1024 steps.
# Usage: bash benchmarks/fp8_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=6 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/quant/test_fp8_gpu.py \
    tests/model/test_triton_decode.py
TAIL=14 step gemv 200 $py benchmarks/fp8_bench.py --gemv-sweep --skip-model --json "$out/fp8-gemv.json"
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=5 step grid-fp8w 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --cells 1x8000 \
    --steps 32 --json "$out/grid-fp8w.json"
rm -rf /tmp/l8b-fp8
step ckpt 100 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=4 step grid-fp8kv 80 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 --steps 32 \
    --kv-cache-dtype fp8 --json "$out/grid-fp8kv.json"
