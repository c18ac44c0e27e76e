#!/bin/bash
# Where a decode step's greedy argmax runs (limits.argmax_variant), in one call on one GPU: the GPU tests of the
# engine and the fused ops, the kernel alone (argmax_speed.py), then decode steps in alternating runs of "torch"
# (torch's argmax after the replay, as before), "graph" (fused_ops.argmax_rows inside the decode graph, as
# shipped) and once "rows" (argmax_rows after the replay): the Llama-3-8B shape with 128x128-block FP8 weights at
# 1 x 128, bf16 at 1 x 128 and 128 x 512, and Qwen3-30B-A3B at batch 1.
# Usage: bash benchmarks/argmax_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
TAIL=4 step gpu-tests 200 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_fused_ops.py tests/engine
TAIL=12 step argmax-speed 100 $py benchmarks/argmax_speed.py --rows 1 64 128 --json "$out/argmax-speed.json"
step ckpt-fp8 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b-fp8 --device cuda --fp8 block
n=0
for variant in torch graph torch graph rows; do
    n=$((n + 1))
    TAIL=3 step fp8-$variant-$n 100 $py benchmarks/decode_grid.py /tmp/l8b-fp8 --batch 1 --context 128 --steps 48 \
        --argmax $variant --json "$out/fp8-$variant-$n.json"
done
rm -rf /tmp/l8b-fp8
step ckpt-bf16 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
for variant in torch graph torch graph; do
    n=$((n + 1))
    TAIL=3 step bf16-$variant-$n 100 $py benchmarks/decode_grid.py /tmp/l8b --batch 1 --context 128 --cells 128x512 \
        --steps 48 --argmax $variant --json "$out/bf16-$variant-$n.json"
done
rm -rf /tmp/l8b
for variant in torch graph torch graph; do
    n=$((n + 1))
    TAIL=2 step moe-$variant-$n 100 $py benchmarks/moe_speed.py --batch 1 --prefill 0 --steps 60 --argmax $variant
done
