#!/bin/bash
# The paged prefill kernel (model/triton_prefill.py) on one GPU, one call: its GPU tests and the mixed-step ones,
# then `chunk_step.py` with the torch path (PDLAUNCH_PAGED_PREFILL=torch) and the kernel (auto), alternating, at
# prompt-token caps beside decodes of 360 and 1024 (budget 8192) and at a 2048-token budget (a prompt's chunks
# alone), after one layer's attention alone per chunk and context (`prefill_kernel_speed.py`, JSON in OUT_DIR).
# Usage: bash benchmarks/prefill_kernel_round.sh OUT_DIR   (CKPT: the 8B checkpoint, default /dev/shm/l8b;
#        LAUNCHES: PDLAUNCH_PREFILL_LAUNCH settings the speed step times beside the default)
source "$(dirname "$0")/steps.sh"
ckpt=${CKPT:-/dev/shm/l8b}
TAIL=4 step gpu-tests 240 $py -m pytest -q -p no:cacheprovider -m gpu tests/model/test_triton_prefill.py \
    tests/engine/test_mixed_graphs.py tests/engine/test_prompt_rows.py
TAIL=30 step kernel-speed 240 $py benchmarks/prefill_kernel_speed.py --json "$out/kernel-speed.json" \
    --launches ${LAUNCHES:-32,64,8,3 16,128,4,2}
[ -f "$ckpt/config.json" ] || step checkpoint 120 $py -m pdlaunch bench make-checkpoint "$ckpt" --device cuda
for args in "--budget 8192 --cap 360" "--budget 8192 --cap 1024" "--budget 2048"; do
    for mode in ${MODES:-torch auto}; do
        name="chunk-$mode-$(echo "$args" | tr -d ' -')"
        PDLAUNCH_PAGED_PREFILL=$mode TAIL=0 step "$name" 150 $py benchmarks/chunk_step.py "$ckpt" $args
        grep -E "step ms|mean step" "$logs/$name.log"
    done
done
