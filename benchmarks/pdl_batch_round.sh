#!/bin/bash
# Every kernel of ours launched dependent at batch 64 too (PDLAUNCH_PDL=all) against the default (batch 1 only), on
# one GPU in one call: the PDL, fp8 MoE and CUDA-graph GPU tests under `all`, then the Qwen3-30B-A3B shape's
# batch-64 step with block-FP8 experts and attention and an fp8 KV cache, and with bf16, alternating the two
# settings (issue 27's <= 0.65x is the fp8 step over the bf16 one).
# Usage: bash benchmarks/pdl_batch_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests-all 200 env PDLAUNCH_PDL=all $py -m pytest -q -p no:cacheprovider tests/model/test_pdl.py \
    tests/quant/test_fp8_moe_gpu.py tests/engine/test_cuda_graphs.py
for pdl in auto all auto all; do
    TAIL=1 step moe-fp8-b64-$pdl 120 env PDLAUNCH_PDL=$pdl $py benchmarks/moe_speed.py --batch 64 --steps 40 \
        --prefill 0 --fp8-experts --fp8-attention --kv-cache-dtype fp8 --json "$out/moe-fp8-b64-$pdl-$SECONDS.json"
done
for pdl in auto all; do
    TAIL=1 step moe-bf16-b64-$pdl 150 env PDLAUNCH_PDL=$pdl $py benchmarks/moe_speed.py --batch 64 --steps 40 \
        --prefill 0 --json "$out/moe-bf16-b64-$pdl.json"
done
