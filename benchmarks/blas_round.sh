#!/bin/bash
# PDLAUNCH_BLAS settings against each other in one call on one GPU (model/blas.py): its GPU tests, then, alternating
# twice, the 8B decode grid (`decode_grid.py`) and `engine_speed.py` (decode batch 1 and 64, prefill of 4096
# tokens) under each setting. The default changes only if decode gains and prefill does not lose.
# Usage: [SETTINGS="cublas cublaslt-decode"] [LOGS=/tmp/logs] bash benchmarks/blas_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=3 step gpu-test 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_blas.py
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
for run in 1 2; do
    for blas in ${SETTINGS:-cublas cublaslt-decode}; do
        TAIL=6 PDLAUNCH_BLAS=$blas step grid-$blas-$run 120 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 \
            --context 3072 --cells 64x1024 128x512 --steps 32 --json "$out/grid-$blas-$run.json"
        TAIL=4 PDLAUNCH_BLAS=$blas step speed-$blas-$run 120 $py benchmarks/engine_speed.py /tmp/l8b \
            --json "$out/speed-$blas-$run.json"
    done
done
