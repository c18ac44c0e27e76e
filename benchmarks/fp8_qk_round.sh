#!/bin/bash
# The fp8 paged decode's key product in float16 (default) against bf16 (PDLAUNCH_FP8_QK=bf16), and the kernel of
# 04490cb (BASELINE, a copy of that tree's triton_decode.py) timed on the same cache, in one call on one GPU:
# the 8B shape with block-FP8 weights and an fp8 KV cache (issue 27's 48 x 3072 <= 1.3x), the Qwen3-30B-A3B shape
# with block-FP8 experts and attention and an fp8 KV cache at batch 64 against its bf16 step (issue 27's <= 0.65x),
# the GPU tests of the kernel, then the bf16 8B grid against the baseline kernel.
# Usage: BASELINE=old_triton_decode.py bash benchmarks/fp8_qk_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
base=${BASELINE:?BASELINE: a triton_decode.py to time beside this tree}
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
for qk in f16 bf16; do
    TAIL=3 step grid-fp8-$qk 100 env PDLAUNCH_FP8_QK=$qk $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 48 \
        --context 3072 --cells 64x1024 --steps 32 --kv-cache-dtype fp8 --baseline-kernel "$base" \
        --json "$out/grid-fp8w-fp8kv-$qk.json"
done
rm -rf /tmp/l8b-fp8
for qk in f16 bf16 f16 bf16; do
    TAIL=1 step moe-fp8-$qk 120 env PDLAUNCH_FP8_QK=$qk $py benchmarks/moe_speed.py --batch 64 --steps 40 --prefill 0 \
        --fp8-experts --fp8-attention --kv-cache-dtype fp8 --json "$out/moe-fp8-b64-$qk.json"
done
TAIL=1 step moe-bf16 150 $py benchmarks/moe_speed.py --batch 64 --steps 40 --prefill 0 --json "$out/moe-bf16-b64.json"
TAIL=6 step gpu-tests 200 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_triton_decode.py \
    tests/quant/test_fp8_gpu.py tests/model/test_pdl.py tests/engine/test_prompt_rows.py tests/engine/test_cuda_graphs.py
step ckpt 100 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=8 step grid-bf16 150 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 1x8000 \
    128x512 1x128 --steps 32 --baseline-kernel "$base" --json "$out/grid-bf16.json"
