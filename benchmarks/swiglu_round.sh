#!/bin/bash
# The SwiGLU-in-the-epilogue GEMM and the float32 LM head (one H200 or H100), in one call: the kernel sweep
# against cuBLAS + silu_and_mul at decode rows (benchmarks/swiglu_speed.py), the new kernels' GPU tests, and the
# bf16 greedy-parity GPU tests that the float32 logits could move.
# Usage: bash benchmarks/swiglu_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=12 step sweep 330 $py benchmarks/swiglu_speed.py --rows 2 8 16 32 64 128 --json "$out/swiglu-speed.json"
TAIL=6 step gpu-tests 220 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_swiglu.py \
    tests/model/test_lm_head.py tests/model/test_gpu.py tests/model/test_qwen3_llama32_gpu.py \
    tests/model/test_moe_gpu.py tests/engine/test_engine_gpu.py tests/engine/test_cuda_graphs.py
