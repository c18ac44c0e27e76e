#!/bin/bash
# The pull's READ posted before its claim is sent (new) against the claim sent first (OLD_PULL: a copy of the
# old decode/pull.py), two GPUs, one call: per order a probe run of 1k-token pulls (benchmarks/kv_probe: ms after
# start_load of the claim's send, the READ's post, the load's end) and `bench kv-transfer` pull at 1k and 8k
# tokens, the orders alternated twice.
# Usage: OLD_PULL=path bash benchmarks/kv_pull_order_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
new=pdlaunch/kv_transfer/decode/pull.py
cp "$new" "$out/pull_new.py"
kv=(--device cuda:0 --decode-device cuda:1 --mode pull --iterations 30)
for round in 1 2; do
    for order in new old; do
        if [ $order = old ]; then cp "${OLD_PULL:?}" "$new"; else cp "$out/pull_new.py" "$new"; fi
        TAIL=10 PDL_PROBE=1 PYTHONPATH=benchmarks/kv_probe:$PYTHONPATH step "probe-$order-$round" 120 $py -m pdlaunch \
            bench kv-transfer "${kv[@]}" --num-tokens 1024
        TAIL=6 step "kv-$order-$round" 120 $py -m pdlaunch bench kv-transfer "${kv[@]}" --num-tokens 1024 \
            --num-tokens 8192 --json "$out/kv-$order-$round.json"
    done
done
cp "$out/pull_new.py" "$new"
