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
TAIL=3 step ready 300 $py - "$port" "$serve_pid" <<'EOF'
import os, sys, time, httpx
port, pid = sys.argv[1], int(sys.argv[2])
deadline = time.monotonic() + 290
while time.monotonic() < deadline:
    try:
        if httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2, trust_env=False).status_code == 200:
            print("server ready"); sys.exit(0)
    except httpx.HTTPError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the server exited before it was ready (serve.log)")
    time.sleep(1)
sys.exit("the server was not ready after 290 s (serve.log)")
EOF
TAIL=30 step bench 420 $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port --num-prompts "$prompts" \
    --num-warmups 2 --random-input-len 2048 --random-output-len 1024 --max-concurrency 10 --ignore-eos \
    --save-result --result-dir "$out" --result-filename anchor.json
kill -TERM $serve_pid
timeout 60 tail --pid=$serve_pid -f /dev/null || kill -KILL $serve_pid
wait $serve_pid 2>/dev/null
tail -5 "$out/serve.log"
