#!/bin/bash
# The TMA launches of the decode and SwiGLU GEMM tables against the tree before (OLD_TREE: an unpacked `git
# archive` of it), one GPU, one call: the GPU tests of both kernels (PHASE1=1: `make test-gpu`'s first phase,
# tests/model tests/quant tests/engine, instead), then the 8B-shape decode grid's 128 x 512, 64 x 1024 and
# 48 x 3072 cells, the trees alternated twice.
# Usage: OLD_TREE=dir bash benchmarks/tma_grid_round.sh OUT_DIR   (from the new tree; PYTHONPATH holds the packages)
source "$(dirname "$0")/steps.sh"
old=${OLD_TREE:?OLD_TREE}
if [ "${PHASE1:-0}" = 1 ]; then
    TAIL=4 step gpu-phase1 300 $py -m pytest -q -p no:cacheprovider -n 4 -m "gpu and not gpu_serial" tests/model \
        tests/quant tests/engine
else
    TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -n 4 -m gpu tests/model/test_decode_gemm.py \
        tests/model/test_swiglu.py
fi
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 128 --context 512 --cells 64x1024 48x3072 --steps 32)
for round in 1 2; do
    TAIL=6 step "grid-new-$round" 150 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --json "$out/grid-new-$round.json"
    (cd "$old" && PYTHONPATH="$old:${PYTHONPATH:-}" TAIL=6 step "grid-old-$round" 150 $py benchmarks/decode_grid.py \
        /tmp/l8b "${cells[@]}" --json "$out/grid-old-$round.json")
done
