#!/bin/bash
# Issue 29 item 2 on a two-GPU host, one call: `bench kv-transfer` across the GPUs (bf16 KV, pull and push, 1k and
# 8k tokens) for this tree and for BASELINES="DIR ..." (each DIR holds a copy of the `pdlaunch` package, e.g.
# `git archive COMMIT pdlaunch | tar -x -C DIR`), run before and after this tree's rows (an A/B on one machine);
# then the fp8 rows; then PROBE=1: a 1k-token pull run with benchmarks/kv_probe's stage timestamps.
# PATCHES="FILE ..." adds a variant per patch (e.g. benchmarks/patches/*.patch): this tree's `pdlaunch` copied and
# the patch applied (`git apply`, which needs no repository), timed like a baseline.
# Usage: bash benchmarks/kv_ab_round.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
for patch in ${PATCHES:-}; do
    dir=/tmp/kv-variant-$(basename "$patch" .patch)
    rm -rf "$dir" && mkdir -p "$dir" && cp -r pdlaunch "$dir/"
    file=$(realpath "$patch")
    (cd "$dir" && git apply "$file") || { echo "== $patch does not apply to this tree"; exit 1; }
    BASELINES="${BASELINES:-} $dir"
done
kv=(--device cuda:0 --decode-device cuda:1 --num-tokens 1024 --num-tokens 8192 --iterations 15)
baselines() {
    for dir in ${BASELINES:-}; do
        TAIL=8 PYTHONPATH="$dir:${PYTHONPATH:-}" step "kv-bf16-$(basename "$dir")-$1" 200 $py -m pdlaunch bench \
            kv-transfer "${kv[@]}" --mode pull --mode push --json "$out/kv-bf16-$(basename "$dir")-$1.json"
    done
}
baselines 1
TAIL=8 step kv-bf16 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" --mode pull --mode push --json "$out/kv-bf16.json"
baselines 2
TAIL=8 step kv-fp8 200 $py -m pdlaunch bench kv-transfer "${kv[@]}" --mode pull --mode push --kv-cache-dtype fp8 \
    --json "$out/kv-fp8.json"
if [ -n "${PROBE:-}" ]; then
    TAIL=30 PDL_PROBE=1 PYTHONPATH="$(dirname "$0")/kv_probe:${PYTHONPATH:-}" step kv-probe 200 $py -m pdlaunch bench \
        kv-transfer --device cuda:0 --decode-device cuda:1 --num-tokens 1024 --mode pull --iterations 40
fi
