#!/bin/bash
# Weights into L2 while the kernel before runs (model/prefetch.py), in one call on one GPU: the dependent-launch
# GPU tests with every PDLAUNCH_PREFETCH mode on, then batch-1 decode steps of the Qwen3-30B-A3B shape
# (moe_speed.py) and the Llama-3-8B shape (decode_grid.py) per mode, alternating with the modes off.
# Usage: bash benchmarks/prefetch_round.sh OUT_DIR [moe|dense|both]
source "$(dirname "$0")/steps.sh"
what=${2:-both}
PDLAUNCH_PREFETCH=attn,gemv,moe TAIL=4 step gpu-tests ${GPU_TESTS_LIMIT:-150} $py -m pytest -q -p no:cacheprovider \
    -m gpu tests/model/test_pdl.py tests/model/test_gemv_gpu.py tests/engine/test_warm_up.py
if [[ $what != dense ]]; then
    for modes in ${MOE_MODES:-off attn,gemv moe moe,last attn,gemv,moe off}; do
        PDLAUNCH_PREFETCH=$modes TAIL=3 step "moe-b1-${modes//,/+}" 120 $py benchmarks/moe_speed.py --batch 1 \
            --prefill 0 --steps 60 --json "$out/moe-b1-${modes//,/+}-$SECONDS.json"
    done
fi
if [[ $what != moe ]]; then
    [ -d /tmp/l8b ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
    for modes in ${DENSE_MODES:-off attn,gemv attn gemv off}; do
        PDLAUNCH_PREFETCH=$modes TAIL=5 step "dense-b1-${modes//,/+}" 90 $py benchmarks/decode_grid.py /tmp/l8b \
            --batch 1 --context 128 --cells 1x8000 --steps 32 --json "$out/dense-b1-${modes//,/+}-$SECONDS.json"
    done
fi
