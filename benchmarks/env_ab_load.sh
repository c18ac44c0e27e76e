#!/bin/bash
# An A/B of one environment variable under load on a two-GPU host, in one device call: the 8B shape served
# colocated twice at once, VAR=A on GPU 0 and VAR=B on GPU 1, each loaded by `bench serve` (PROMPTS, default 256,
# requests of INPUT_LEN / OUTPUT_LEN tokens, default 1024 / 256, at most CONCURRENCY, default 64, in flight); then
# again with the GPUs swapped, so a difference between the GPUs shows as such. Each result JSON lands in OUT_DIR
# as ab-<value>-gpu<N>.json.
# Usage: VAR=PDLAUNCH_ARRIVAL_WINDOW A=on B=off bash benchmarks/env_ab_load.sh OUT_DIR
#        (CKPT, default /tmp/l8b, made by `bench make-checkpoint` if missing)
source "$(dirname "$0")/steps.sh"
var=${VAR:?VAR: the environment variable to compare}
ckpt=${CKPT:-/tmp/l8b}
[ -f "$ckpt/config.json" ] || step checkpoint 300 $py -m pdlaunch bench make-checkpoint --device cuda "$ckpt"

# `one_side VALUE GPU`: serve with VAR=VALUE on GPU, load it, stop it (run in the background, one per GPU)
one_side() {
    local value=$1 gpu=$2 port=$((8100 + 100 * $2)) pid  # apart: each serve's instances take the ports after its own
    env "$var=$value" CUDA_VISIBLE_DEVICES=$gpu $py -m pdlaunch serve --model "$ckpt" --colocated \
        --max-model-len 4096 --port $port --log-dir "$logs/logs-$value-gpu$gpu" > "$logs/serve-$value-gpu$gpu.log" 2>&1 &
    pid=$!
    if wait_ready $port $pid 300; then
        TAIL=${TAIL:-12} step "bench-$value-gpu$gpu" 240 $py -m pdlaunch bench serve \
            --base-url http://127.0.0.1:$port --num-prompts "${PROMPTS:-256}" --num-warmups 8 \
            --random-input-len "${INPUT_LEN:-1024}" --random-output-len "${OUTPUT_LEN:-256}" \
            --max-concurrency "${CONCURRENCY:-64}" --ignore-eos --save-result --result-dir "$out" \
            --result-filename "ab-$value-gpu$gpu.json"
        curl -s "http://127.0.0.1:$port/metrics" | grep -E "^pdlaunch_engine_(late_launches|steps)_total" | head -4
    else
        tail -20 "$logs/serve-$value-gpu$gpu.log"
    fi
    stop_server $pid
}

for pair in "${A:?A: one value} ${B:?B: the other}" "$B $A"; do
    set -- $pair
    one_side "$1" 0 > "$logs/side0.txt" 2>&1 &
    s0=$!
    one_side "$2" 1 > "$logs/side1.txt" 2>&1 &
    s1=$!
    wait $s0 $s1
    echo "== $var=$1 on GPU 0, $var=$2 on GPU 1"; cat "$logs/side0.txt" "$logs/side1.txt"
done
