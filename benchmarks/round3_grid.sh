#!/bin/bash
# Issues 29 and 27 on one GPU, in one call (each step bounded so the call ends inside 10 minutes):
# the 8B-shape decode grid with async scheduling off, then on; the 48 x 3072 cell with an fp8 KV cache;
# `bench kv-transfer` pull and push at 1k / 8k tokens with a bf16 and an fp8 cache.
# Usage: bash benchmarks/round3_grid.sh OUT_DIR
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
cells=(--batch 48 --context 3072 --cells 64x1024 1x8000 128x512 1x128 --steps 32)
echo "== commit $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)"; nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
step() {  # step NAME LIMIT_S CMD...: run, log to OUT/NAME.log, print its tail
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name rc $? at $((SECONDS - t0)) s"; tail -"${TAIL:-9}" "$out/$name.log"
}
step make-checkpoint 120 $py -m pdlaunch bench make-checkpoint /tmp/l8b --device cuda
step grid-sync 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --no-async-scheduling --json "$out/grid-sync.json"
step grid-async 120 $py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/grid-async.json"
TAIL=4 step grid-fp8kv 90 $py benchmarks/decode_grid.py /tmp/l8b --batch 48 --context 3072 --cells 64x1024 --steps 32 \
    --kv-cache-dtype fp8 --json "$out/grid-fp8kv.json"
kv=(--device cuda --num-tokens 1024 --num-tokens 8192 --mode pull --mode push --iterations 15)
TAIL=8 step kv-bf16 60 $py -m pdlaunch bench kv-transfer "${kv[@]}" --json "$out/kv-bf16.json"
TAIL=8 step kv-fp8 60 $py -m pdlaunch bench kv-transfer "${kv[@]}" --kv-cache-dtype fp8 --json "$out/kv-fp8.json"
