#!/bin/bash
# One colocated 8B-shape instance on one GPU under a Poisson load, once per step token budget (issue 29's
# colocated baseline): `pdlaunch serve --colocated --max-num-batched-tokens B`, then `bench serve` 3072 in /
# 128 out at RATE req/s (default 3: one instance of a round-robin pair at rate 6), the result JSON of each
# budget in OUT_DIR. Each step is bounded (benchmarks/steps.sh).
# OUTPUT_LEN (default 128) and PROMPTS (default 64): RATE=inf OUTPUT_LEN=1 is a saturated prefill.
# EXTRA: more serve flags (e.g. --enforce-eager), TAG: a suffix of the result files. Each bench runs under
# step_load.py: the engine's utilisation and prefill FLOP rate (against a matmul ceiling measured first).
# Usage: BUDGETS="8192 4096 2048 1024" RATE=3 [EXTRA=...] [TAG=...] bash benchmarks/colocated_budgets.sh OUT_DIR
source "$(dirname "$0")/steps.sh"
ckpt=${CKPT:-/dev/shm/l8b}
rate=${RATE:-3}
output_len=${OUTPUT_LEN:-128}
port=8000
[ -f "$ckpt/config.json" ] || step checkpoint 120 $py -m pdlaunch bench make-checkpoint "$ckpt" --device cuda
$py -m pdlaunch.bench.matmul_ceiling --device cuda --dtype bfloat16 > "$out/ceiling.json"
for b in ${BUDGETS:-8192 4096 2048 1024}; do
    $py -m pdlaunch serve --model "$ckpt" --colocated --max-model-len 4096 --max-num-batched-tokens "$b" \
        --port $port ${EXTRA:-} > "$out/serve-$b${TAG:-}.log" 2>&1 &
    pid=$!
    wait_ready $port $pid 240 || tail -5 "$out/serve-$b${TAG:-}.log"
    TAIL=17 step "bench-$b${TAG:-}" 180 $py benchmarks/step_load.py --base-url http://127.0.0.1:$port --model "$ckpt" \
        --input-len 3072 --ceiling "$out/ceiling.json" --json "$out/load-rate$rate-budget$b${TAG:-}.json" -- \
        $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port --num-prompts ${PROMPTS:-64} \
        --num-warmups 4 --random-input-len 3072 --random-output-len $output_len --request-rate "$rate" \
        --save-result --result-dir "$out" --result-filename "rate$rate-budget$b${TAG:-}.json"
    stop_server $pid
done
