#!/bin/bash
# Issues 26 and 27 on one GPU, in one call (each step bounded): the MoE GPU tests, the bf16 and the fp8-expert
# tile sweeps (write configs/<device>.json and <device>_fp8.json, copied to OUT_DIR), then the Qwen3-30B-A3B-shape decode
# grid and 8k prefill (benchmarks/moe_speed.py) with bf16 experts, then with
# 128x128-block fp8 experts, in separate processes.
# Usage: bash benchmarks/moe_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=6 step gpu-tests 150 $py -m pytest -q -p no:cacheprovider tests/quant/test_fp8_moe_gpu.py tests/quant/test_fp8_gpu.py \
    "tests/model/test_moe_gpu.py::test_fused_moe_in_a_cuda_graph_equals_the_reference_loop"
TAIL=12 step moe-kernels-bf16 150 $py benchmarks/moe_kernels.py --write-config --tokens 1 16 64 256 4096 16384 \
    --json "$out/moe-kernels-bf16.json"
TAIL=12 step moe-kernels-fp8 240 $py benchmarks/moe_kernels.py --fp8 --write-config --tokens 1 16 64 256 4096 \
    --json "$out/moe-kernels-fp8.json"
cp pdlaunch/model/moe/configs/*.json "$out/" 2>/dev/null
TAIL=7 step moe-bf16 200 $py benchmarks/moe_speed.py --json "$out/moe-bf16.json"
TAIL=7 step moe-fp8 200 $py benchmarks/moe_speed.py --fp8-experts --json "$out/moe-fp8.json"
