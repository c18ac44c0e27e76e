#!/bin/bash
# The GIL switch interval under load, in one device call: serve the 8B shape colocated on one GPU with
# PDLAUNCH_GIL_SWITCH_MS at each value of SWITCHES (default "0.5 5 0.5 5", alternated so drift shows), and
# at each run `bench serve` PROMPTS (default 256) requests of 1024 in / 128 out, all at once with at most
# CONCURRENCY (default 64) in flight. Each result JSON lands in OUT_DIR as gil-<ms>-<run>.json.
# Usage: bash benchmarks/gil_load.sh OUT_DIR   (CKPT, default /tmp/l8b, made by `bench make-checkpoint` if missing)
source "$(dirname "$0")/steps.sh"
ckpt=${CKPT:-/tmp/l8b}
prompts=${PROMPTS:-256}
concurrency=${CONCURRENCY:-64}
port=8000
[ -f "$ckpt/config.json" ] || step checkpoint 300 $py -m pdlaunch bench make-checkpoint --device cuda "$ckpt"
run=0
for ms in ${SWITCHES:-0.5 5 0.5 5}; do
    run=$((run + 1))
    PDLAUNCH_GIL_SWITCH_MS=$ms $py -m pdlaunch serve --model "$ckpt" --colocated --dtype bfloat16 \
        --max-model-len 4096 --port $port > "$logs/serve-$ms-$run.log" 2>&1 &
    serve_pid=$!
    if wait_ready $port $serve_pid 300; then
        TAIL=${TAIL:-14} step "bench-$ms-$run" 240 $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port \
            --num-prompts "$prompts" --num-warmups 8 --random-input-len 1024 --random-output-len 128 \
            --max-concurrency "$concurrency" --ignore-eos --save-result --result-dir "$out" \
            --result-filename "gil-$ms-$run.json"
    else
        tail -20 "$logs/serve-$ms-$run.log"
    fi
    stop_server $serve_pid
done
