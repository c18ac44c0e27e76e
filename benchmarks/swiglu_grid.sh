#!/bin/bash
# Decode steps with the SwiGLU in the gate_up GEMM's epilogue (model/swiglu.py) and the float32 LM head, against
# the two launches it replaces (PDLAUNCH_SWIGLU=cublas) and the bf16 head (--bf16-logits), in one call on one
# H200: the kernels' GPU tests, then the cells each change can move, alternating both off / head only / both on.
# Usage: bash benchmarks/swiglu_grid.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests 120 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_swiglu.py \
    tests/model/test_lm_head.py
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 8 16 24 32 --context 1024 --cells 1x128 48x3072 64x1024 --steps 32)
for run in 1 2; do
    PDLAUNCH_SWIGLU=cublas TAIL=7 step off-$run 90 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --bf16-logits --json "$out/off-$run.json"
    PDLAUNCH_SWIGLU=cublas TAIL=7 step head-$run 90 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --json "$out/head-$run.json"
    TAIL=7 step on-$run 90 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/on-$run.json"
done
