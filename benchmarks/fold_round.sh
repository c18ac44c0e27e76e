#!/bin/bash
# The block-FP8 GEMV's launches (kernels.gemv_launch: the per-shape table, else the fold rule), in one call on one
# GPU: the kernel folded and not per shape (fp8_bench.py --gemv-fold), then the Llama-3-8B-shape block-FP8 decode
# step at 1 x 128 and 1 x 8000 in alternating pairs, untuned (--no-gemv-fold: 8 x 1024 x 4, never folded) and as
# shipped ("rule" in the file names: at the session that wrote this, before the table, the fold rule alone).
# Usage: bash benchmarks/fold_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=12 step gemv-fold 150 $py benchmarks/fp8_bench.py --gemv-fold --json "$out/gemv-fold.json"
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
for pair in 1 2; do
    for variant in never rule; do
        flag=$([ $variant = never ] && echo --no-gemv-fold)
        TAIL=4 step grid-$variant-$pair 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 \
            --cells 1x8000 --steps 32 $flag --json "$out/grid-$variant-$pair.json"
    done
done
rm -rf /tmp/l8b-fp8
