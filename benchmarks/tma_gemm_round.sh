#!/bin/bash
# The TMA launches of the decode GEMM and of the SwiGLU GEMM (model/decode_gemm.py, model/swiglu.py) at 48, 64 and
# 128 rows, in one call on one H200: the two kernels' GPU tests, then the decode GEMM's TMA sweep compiled on 16
# processes at once and timed against cuBLAS (tma_gemm_speed.py), then the SwiGLU GEMM's TMA sweep against cuBLAS +
# silu_and_mul (swiglu_speed.py --tma).
# Usage: bash benchmarks/tma_gemm_round.sh OUT_DIR [SHAPES...]
source "$(dirname "$0")/steps.sh"
shift
if [ $# -gt 0 ]; then shapes=("$@"); else shapes=(qkv o down); fi
rows=(48 64 128)
TAIL=4 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider -n 4 -m gpu tests/model/test_decode_gemm.py \
    tests/model/test_swiglu.py
TAIL=6 step check 120 $py benchmarks/tma_gemm_speed.py --check-only
for i in $(seq 0 15); do
    timeout 240 $py benchmarks/tma_gemm_speed.py --rows "${rows[@]}" --compile-only --part $i/16 \
        --shapes "${shapes[@]}" > "$logs/compile-$i.log" 2>&1 &
done
wait
echo "== compiled at $((SECONDS - t0)) s"; cat "$logs"/compile-*.log | grep -v OutOfResources | tail -8
TAIL=12 step sweep 240 $py benchmarks/tma_gemm_speed.py --rows "${rows[@]}" --shapes "${shapes[@]}" \
    --json "$out/sweep.json"
TAIL=4 step swiglu-tma 200 $py benchmarks/swiglu_speed.py --tma --rows "${rows[@]}" --json "$out/swiglu-tma.json"
TAIL=4 step swiglu 150 $py benchmarks/swiglu_speed.py --rows "${rows[@]}" --json "$out/swiglu.json"
