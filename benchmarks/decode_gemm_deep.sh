#!/bin/bash
# The decode GEMM (model/decode_gemm.py) at 64 and 128 rows in deeper pipelines, in one call on one H200: compile
# the sweep's launches (decode_gemm_speed.py --deep) on 16 processes at once, time them. With `grid SWEEP_JSON`:
# the kernel's GPU tests, then the 48 x 3072, 64 x 1024 and 128 x 512 decode cells with the committed table against
# the committed table plus the sweep's winners (decode_grid.py --decode-gemm-table --merge-table), alternating twice.
# Usage: bash benchmarks/decode_gemm_deep.sh OUT_DIR sweep [SHAPES...] | grid SWEEP_JSON
source "$(dirname "$0")/steps.sh"
mode=${2:?sweep or grid}
if [[ $mode == sweep ]]; then
    shift 2
    if [ $# -gt 0 ]; then shapes=("$@"); else shapes=(qkv o down gate_up); fi
    for i in $(seq 0 15); do
        timeout 240 $py benchmarks/decode_gemm_speed.py --deep --rows 64 128 --compile-only --part $i/16 \
            --shapes "${shapes[@]}" > "$out/compile-$i.log" 2>&1 &
    done
    wait
    echo "== compiled at $((SECONDS - t0)) s"; cat "$out"/compile-*.log | grep -v OutOfResources | tail -5
    TAIL=10 step sweep 320 $py benchmarks/decode_gemm_speed.py --deep --rows 64 128 --shapes "${shapes[@]}" \
        --json "$out/sweep.json"
else
    sweep=${3:?SWEEP_JSON}
    [ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
    TAIL=4 step gpu-tests 120 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_decode_gemm.py
    cells=(--batch 64 --context 1024 --cells 48x3072 128x512 --steps 32)
    for run in 1 2; do
        TAIL=6 step committed-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/committed-$run.json"
        TAIL=6 step merged-$run 80 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --decode-gemm-table "$sweep" \
            --merge-table --json "$out/merged-$run.json"
    done
fi
