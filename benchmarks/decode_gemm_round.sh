#!/bin/bash
# A decode batch's projections through the dependent-launched Triton GEMM (model/decode_gemm.py) against cuBLAS,
# in one call on one H200: compile the sweep's launches on 16 processes at once, time them
# (benchmarks/decode_gemm_speed.py), run the kernel's GPU tests, then the batched cells of the decode grid with the
# sweep's fastest launches as the table (decode_grid.py --decode-gemm-table) against PDLAUNCH_DECODE_GEMM=cublas,
# alternating twice.
# Usage: bash benchmarks/decode_gemm_round.sh OUT_DIR [SHAPES...]
source "$(dirname "$0")/steps.sh"
shift
if [ $# -gt 0 ]; then shapes=("$@"); else shapes=(qkv o down moe-qkv moe-o); fi
for i in $(seq 0 15); do
    timeout 240 $py benchmarks/decode_gemm_speed.py --compile-only --part $i/16 --shapes "${shapes[@]}" \
        > "$out/compile-$i.log" 2>&1 &
done
wait
echo "== compiled at $((SECONDS - t0)) s"; cat "$out"/compile-*.log | grep -v OutOfResources | tail -5
TAIL=16 step sweep 200 $py benchmarks/decode_gemm_speed.py --shapes "${shapes[@]}" --json "$out/sweep.json"
TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_decode_gemm.py \
    tests/model/test_swiglu.py tests/model/test_triton_decode.py
[ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
cells=(--batch 16 32 64 --context 1024 --cells 48x3072 --steps 32)
for run in 1 2; do
    PDLAUNCH_DECODE_GEMM=cublas TAIL=6 step off-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --json "$out/off-$run.json"
    TAIL=6 step on-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" \
        --decode-gemm-table "$out/sweep.json" --json "$out/on-$run.json"
done
