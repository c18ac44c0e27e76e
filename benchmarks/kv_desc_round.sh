#!/bin/bash
# Issue 29 item 2 on a two-GPU host: `bench kv-transfer` across the GPUs (bf16 and fp8 KV, pull and push, 1k and 8k
# tokens), in one call:
#   BASELINES="DIR ..."  each DIR holds a copy of the `pdlaunch` package (e.g. `git archive COMMIT pdlaunch | tar -x
#                        -C DIR`): its bf16 rows run before and after this tree's, for an A/B on one machine
#   CAPS="0 64"          runs of blocks cut into descriptors of at most PDLAUNCH_KV_DESCRIPTOR_MIB (0: one per run)
#   PROBE=DIR            a DIR/sitecustomize.py put on the path of one more 1k-token pull run (stage timestamps)
# Usage: bash benchmarks/kv_desc_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
kv=(--device cuda:0 --decode-device cuda:1 --num-tokens 1024 --num-tokens 8192 --iterations 15)
baselines() {
    for dir in ${BASELINES:-}; do
        TAIL=8 PYTHONPATH="$dir:${PYTHONPATH:-}" step "kv-bf16-$(basename "$dir")-$1" 200 $py -m pdlaunch bench \
            kv-transfer "${kv[@]}" --mode pull --mode push --json "$out/kv-bf16-$(basename "$dir")-$1.json"
    done
}
baselines 1
for cap in ${CAPS:-0}; do
    TAIL=8 PDLAUNCH_KV_DESCRIPTOR_MIB=$cap step "kv-bf16-cap$cap" 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" \
        --mode pull --mode push --json "$out/kv-bf16-cap$cap.json"
done
baselines 2
TAIL=8 step kv-fp8 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" --mode pull --mode push --kv-cache-dtype fp8 \
    --json "$out/kv-fp8.json"
if [ -n "${PROBE:-}" ]; then
    TAIL=30 PDL_PROBE=1 PYTHONPATH="$PROBE:${PYTHONPATH:-}" step kv-probe 200 $py -m pdlaunch bench kv-transfer \
        --device cuda:0 --decode-device cuda:1 --num-tokens 1024 --mode pull --iterations 40
fi
