#!/bin/bash
# Issue 29 on one GPU, in one call: the decode grid with async scheduling off, then on (same process order,
# same checkpoint), the async on/off GPU parity test, and `bench kv-transfer` push at 1k / 8k tokens.
# Usage: bash benchmarks/async_grid.sh OUT_DIR
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
cells=(--batch 48 --context 3072 --cells 64x1024 1x8000 128x512 1x128 --steps 32)
echo "== commit $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)"; nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
$py -m pdlaunch bench make-checkpoint /tmp/l8b > "$out/make-checkpoint.log" 2>&1 || { tail -5 "$out/make-checkpoint.log"; exit 1; }
echo "== checkpoint $((SECONDS - t0)) s"
$py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --no-async-scheduling --json "$out/grid-sync.json" > "$out/grid-sync.log" 2>&1
echo "== grid sync rc $? $((SECONDS - t0)) s"; tail -9 "$out/grid-sync.log"
$py benchmarks/decode_grid.py /tmp/l8b "${cells[@]}" --json "$out/grid-async.json" > "$out/grid-async.log" 2>&1
echo "== grid async rc $? $((SECONDS - t0)) s"; tail -9 "$out/grid-async.log"
$py benchmarks/async_parity.py > "$out/parity.log" 2>&1
echo "== parity rc $? $((SECONDS - t0)) s"; tail -3 "$out/parity.log"
$py -m pdlaunch bench kv-transfer --device cuda --num-tokens 1024 --num-tokens 8192 --mode push --iterations 15 \
    --json "$out/kv-push.json" > "$out/kv-push.log" 2>&1
echo "== kv push rc $? $((SECONDS - t0)) s"; tail -12 "$out/kv-push.log"
