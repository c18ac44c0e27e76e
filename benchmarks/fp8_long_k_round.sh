#!/bin/bash
# Issue 27's 8B cell on one GPU, one call: the FP8 GPU tests, then the Llama-3-8B-shape block-FP8 decode step at
# 48 x 3072 with an fp8 KV cache (<= 1.3x its floor) for this tree and for BASELINE (a copy of the `pdlaunch` package
# at another commit, e.g. `git archive COMMIT pdlaunch | tar -x -C DIR`), alternating, two runs each.
# Usage: BASELINE=DIR bash benchmarks/fp8_long_k_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests 200 $py -m pytest -q -p no:cacheprovider -m gpu tests/quant/test_fp8_gpu.py \
    tests/quant/test_fp8_fused_quant.py
step ckpt-fp8 150 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
grid() {  # NAME [PYTHONPATH prefix]
    TAIL=3 PYTHONPATH="${2:-}${PYTHONPATH:-}" step "$1" 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 48 \
        --context 3072 --steps 32 --kv-cache-dtype fp8 --json "$out/$1.json"
}
for pair in 1 2; do
    grid "grid-base-$pair" "${BASELINE:?BASELINE}:"
    grid "grid-new-$pair"
done
rm -rf /tmp/l8b-fp8
