#!/bin/bash
# Issue 29 item 2 on a two-GPU host: `bench kv-transfer` across the GPUs (bf16 and fp8 KV, pull and push, 1k and 8k
# tokens) with runs of blocks cut into descriptors of at most PDLAUNCH_KV_DESCRIPTOR_MIB (0: one per run), in one
# call; OLD_PULL=path: a copy of the package with that file as decode/pull.py runs the bf16 pull rows too (A/B).
# Usage: bash benchmarks/kv_desc_round.sh OUT_DIR   (CAPS: the caps to try, default "0 64 16"; FP8_CAPS: "0 32")
source "$(dirname "$0")/steps.sh"
kv=(--device cuda:0 --decode-device cuda:1 --num-tokens 1024 --num-tokens 8192 --iterations 15)
if [ -n "${OLD_PULL:-}" ]; then
    old=$(mktemp -d); cp -r pdlaunch "$old/"; cp "$OLD_PULL" "$old/pdlaunch/kv_transfer/decode/pull.py"
    TAIL=6 PYTHONPATH="$old:${PYTHONPATH:-}" step kv-bf16-oldpull 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" \
        --mode pull --json "$out/kv-bf16-oldpull.json"
fi
for cap in ${CAPS:-0 64 16}; do
    TAIL=8 PDLAUNCH_KV_DESCRIPTOR_MIB=$cap step "kv-bf16-cap$cap" 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" \
        --mode pull --mode push --json "$out/kv-bf16-cap$cap.json"
done
for cap in ${FP8_CAPS:-0 32}; do
    TAIL=8 PDLAUNCH_KV_DESCRIPTOR_MIB=$cap step "kv-fp8-cap$cap" 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" \
        --mode pull --mode push --kv-cache-dtype fp8 --json "$out/kv-fp8-cap$cap.json"
done
