#!/bin/bash
# The paged decode's launch at one cell of the 8B decode grid, one call on one GPU: the kernel alone over the launch
# sweep (decode_grid.py --sweep: tile x warps x stages, each checked against float64), then whole steps of that
# cell under choose_launch's launch and under the sweep's fastest (PDLAUNCH_DECODE_LAUNCH), alternating twice.
# Usage: [CELL=128x512] bash benchmarks/decode_launch_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
cell=${CELL:-128x512}
[ -f /tmp/l8b/config.json ] || step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
TAIL=4 step sweep 150 $py benchmarks/decode_grid.py /tmp/l8b --batch "${cell%x*}" --context "${cell#*x}" --steps 32 \
    --sweep --sweep-cells "$cell" --json "$out/sweep.json"
best=$($py -c 'import json, sys
r = json.load(open(sys.argv[1]))["sweep"][0]
print("tile=%d:num_warps=%d:num_stages=%d" % (r["tile"], r["num_warps"], r["num_stages"]))' "$out/sweep.json") || exit 1
echo "== the sweep's fastest launch: $best"
for run in 1 2; do
    for launch in "" "$best"; do
        name=default; [ -n "$launch" ] && name=best
        TAIL=1 PDLAUNCH_DECODE_LAUNCH=$launch step "grid-$name-$run" 90 $py benchmarks/decode_grid.py /tmp/l8b \
            --batch "${cell%x*}" --context "${cell#*x}" --steps 32 --json "$out/grid-$name-$run.json"
    done
done
