#!/bin/bash
# The H200 decode grid of issue 29 at one tree, in one call: the GPU tests of the CUDA-graph and async-scheduling
# paths, then the 8B-shape decode grid (async scheduling, CUDA graphs) twice, and the block-FP8 8B step
# and at 48 x 3072 with an fp8 KV cache (issue 27).
# Usage: bash benchmarks/grid_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/engine/test_cuda_graphs.py \
    tests/engine/test_async_scheduling.py tests/engine/test_sampler.py
cells=(--batch 48 --context 3072 --cells 64x1024 1x8000 128x512 1x128 --steps 32)
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
for run in 1 2; do
    TAIL=8 step grid-$run 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/grid-$run.json"
done
rm -rf /tmp/l8b
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
TAIL=4 step fp8-grid 120 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 48 --context 3072 \
    --steps 32 --kv-cache-dtype fp8 --json "$out/fp8-grid.json"
