#!/bin/bash
# Issue 26's serving anchor in one device call: write the Qwen3-30B-A3B shape (random weights, bf16) to tmpfs,
# serve it colocated on one GPU, run `bench serve` 2048 in / 1024 out at concurrency 10 (vLLM's published
# workload), save the result JSON to OUT_DIR and stop the server. Each step is bounded (benchmarks/steps.sh).
# Usage: bash benchmarks/serving_anchor.sh OUT_DIR   (PROMPTS, default 30; CKPT, default /dev/shm/q3)
source "$(dirname "$0")/steps.sh"
ckpt=${CKPT:-/dev/shm/q3}
prompts=${PROMPTS:-30}
port=8000
[ -f "$ckpt/config.json" ] || step checkpoint 300 $py -m pdlaunch bench make-checkpoint --shape qwen3-30b-a3b \
    --device cuda "$ckpt"
$py -m pdlaunch serve --model "$ckpt" --colocated --dtype bfloat16 --max-model-len 4096 --port $port \
    > "$out/serve.log" 2>&1 &
serve_pid=$!
wait_ready $port $serve_pid 300
TAIL=30 step bench 420 $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port --num-prompts "$prompts" \
    --num-warmups 2 --random-input-len 2048 --random-output-len 1024 --max-concurrency 10 --ignore-eos \
    --save-result --result-dir "$out" --result-filename anchor.json
stop_server $serve_pid
tail -5 "$out/serve.log"
