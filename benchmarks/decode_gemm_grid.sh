#!/bin/bash
# The committed decode-GEMM table (model/decode_gemm.py) in whole decode steps against cuBLAS
# (PDLAUNCH_DECODE_GEMM=cublas), alternating twice, in one call on one H200; then the GPU tests of the model,
# quant and engine packages (every bf16 greedy-parity test runs its batched steps through the new projections).
# Usage: bash benchmarks/decode_gemm_grid.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
[ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 8 16 32 64 --context 1024 --cells 48x3072 128x512 1x128 --steps 32)
for run in 1 2; do
    PDLAUNCH_DECODE_GEMM=cublas TAIL=9 step off-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --json "$out/off-$run.json"
    TAIL=9 step on-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/on-$run.json"
done
TAIL=12 step gpu-tests ${GPU_TESTS_LIMIT:-330} $py -m pytest -q -p no:cacheprovider -m gpu -x tests/model \
    tests/quant tests/engine
