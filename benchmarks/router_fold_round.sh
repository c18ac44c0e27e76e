#!/bin/bash
# The post-attention RMSNorm folded into the MoE router's product (model/moe/router.py norm_and_route) on one GPU,
# one call: the GPU tests of the kernels it touches, then the Qwen3-30B-A3B shape's decode steps (bf16, batch 1 and
# 16, 1k context; then block-FP8 experts and attention with an fp8 KV cache at batch 1) alternating between this
# tree and BASELINE, a folder holding the `pdlaunch` package and benchmarks/moe_speed.py, limits.py and
# ready_kv.py of the tree before the change (`git archive COMMIT pdlaunch | tar -x -C DIR`, and the three scripts
# copied in), whose moe_speed.py runs it.
# Usage: BASELINE=DIR bash benchmarks/router_fold_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
base=${BASELINE:?BASELINE}
bf16() {  # NAME [DIR]: the bf16 batch-1 and batch-16 steps, with DIR's moe_speed.py (and package) when given
    TAIL=2 step "$1" 150 $py "${2:-benchmarks}/moe_speed.py" --batch 1 16 --steps 60 --prefill 0 \
        --json "$out/$1.json"
}
fp8() {
    TAIL=1 step "$1" 120 $py "${2:-benchmarks}/moe_speed.py" --batch 1 --steps 60 --prefill 0 --fp8-experts \
        --fp8-attention --kv-cache-dtype fp8 --json "$out/$1.json"
}
TAIL=4 step gpu-tests 280 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_moe_router.py \
    tests/model/test_pdl.py tests/model/test_fused_ops.py tests/model/test_moe_gpu.py tests/model/test_triton_moe.py \
    tests/quant/test_fp8_moe_gpu.py
bf16 moe-bf16-new-1
bf16 moe-bf16-old-1 "$base"
bf16 moe-bf16-new-2
bf16 moe-bf16-old-2 "$base"
fp8 moe-fp8-new
fp8 moe-fp8-old "$base"
