#!/bin/bash
# A decode batch's SwiGLU GEMM launched dependent on the RMSNorm before it (triton_decode.pdl_release) against
# plain launches (PDLAUNCH_PDL=off), in one call on one H200: the GPU tests of the kernels involved, then the
# batched cells the SwiGLU kernel serves, alternating off / on twice.
# Usage: bash benchmarks/swiglu_pdl.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_swiglu.py \
    tests/model/test_fused_ops.py tests/model/test_pdl.py tests/engine/test_cuda_graphs.py
[ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 8 16 32 64 --context 1024 --steps 32)
for run in 1 2; do
    PDLAUNCH_PDL=off TAIL=6 step off-$run 70 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/off-$run.json"
    TAIL=6 step on-$run 70 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/on-$run.json"
done
