#!/bin/bash
# The two-GPU acceptance runs of issues 26, 27, 29 and 31, one PART per device call (nvidia-h200-x2, NVLink;
# each part is bounded to end inside a call's 10 minutes, benchmarks/steps.sh). Figures go to OUT_DIR.
#   kv          `bench kv-transfer` across the two GPUs, pull and push, 1k and 8k tokens, bf16 and fp8 KV
#               (issue 29's transfer targets; issue 27's "half the bytes at >= the bf16 GB/s")
#   compare     `bench compare` 1P1D against two colocated instances, 8B shape, 3072 in / 128 out, rates 4 and 6:
#               both SLO sets, ITL p99, the advisor (issue 29; colocated ITL p99 <= 40 ms at rate 6)
#   mixed       the same with half 64-token and half 3072-token prompts and a third deployment that runs prompts
#               of fewer than 256 uncached tokens on the decode alone (issue 31's per-request disaggregation);
#               MAX_QUEUE=N: that deployment also spills prompts to the decode while the prefill has N tokens queued;
#               MAX_ITL=MS: ... and sends them PD while the decode's streams wait MS ms or more a token;
#               BASELINE=DIR (an earlier mixed part's OUT_DIR/mixed): only that third deployment runs, beside DIR's
#               colocated and PD runs (an A/B of MAX_QUEUE / MAX_ITL at a third of the device time)
#   mixed-sweep the mixed part once (MAX_QUEUE / MAX_ITL as given), then only its per-request disaggregation
#               deployment again for each Q:T of SWEEP (e.g. SWEEP="8192: 6144:9 4096:9"; an empty side leaves that
#               flag off), each beside the first run's colocated and PD runs (BASELINE): OUT_DIR/sweep-Q-T/mixed, its table
#               also as OUT_DIR/sweep-Q-T.json
#   mixed-caps  the mixed part once per prompt-token cap of CAPS (e.g. CAPS="360 1024"), all three deployments each
#               time under `scheduler: {prompt_tokens_while_decoding: CAP}` (the colocated pair and the decode that
#               takes spilled prompts chunk them alike): OUT_DIR/cap-CAP/mixed, its table also as OUT_DIR/cap-CAP.json
#   multiturn   1P1D, `bench serve --multi-turn`: round robin without prefix caching (no reuse anywhere), round
#               robin, prefix routing, prefix routing with --disaggregate-min-tokens MT_MIN_TOKENS (default 512),
#               each on a fresh deployment (issue 31's prefill tokens, KV bytes and TTFT p50 ratios);
#               MT_SKIP_NO_REUSE, MT_SKIP_ROUND_ROBIN, MT_SKIP_PREFIX (non-empty) leave that deployment out;
#               MT_EXTRA adds serve flags to each of them (e.g. "--proxy-workers 4")
#   moe         `bench compare` on the Qwen3-30B-A3B shape at the tight SLOs, rates 2-8 (issue 26; ~300 s on 2x H100)
#   turns1      one GPU: the multiturn workload on one colocated instance (every turn where the decode-only turns
#               of `multiturn` run), then one conversation alone: the instance's own TTFT by stage under that
#               load and without it (serve_probe.py)
# Usage: bash benchmarks/two_gpu_round.sh OUT_DIR PART   (CKPT: the 8B checkpoint, default /dev/shm/l8b;
#        MOE_CKPT: default /dev/shm/q3; RATES overrides a compare part's rates, NUM_PROMPTS the mixed part's
#        requests per rate (default 64), DURATION instead seconds of arrivals per rate (`bench compare --duration`:
#        rate x DURATION requests each), MT_ARGS the multiturn workload,
#        COMPARE_CONFIG gives the compare and mixed parts a base deployment YAML, e.g. a smaller chunk budget or
#        `scheduler: {prompt_tokens_while_decoding: 0}` (no prompt-token cap beside decodes);
#        SPY=path/to/py-spy records each instance's stacks (raw, per thread; SPY_GIL=1: only while holding the
#        interpreter lock) over the first SPY_SECONDS (default 6) of every serve round's bench).
#        WARM_BENCH=1 runs each serve round's bench once first with another seed (saved as NAME-first.json), so
#        the measured bench finds a deployment that has served traffic (a fresh one's first bench runs cold).
#        A dry run of the multiturn part on a CPU: CKPT=tiny MT_ARGS="--multi-turn --num-conversations 2 ...".
source "$(dirname "$0")/steps.sh"
part=${2:?PART: kv | compare | mixed | mixed-sweep | mixed-caps | multiturn | moe | turns1}
ckpt=${CKPT:-/dev/shm/l8b}
moe_ckpt=${MOE_CKPT:-/dev/shm/q3}
port=8000

need_8b() {
    [ -f "$ckpt/config.json" ] || [ "$ckpt" = tiny ] ||
        step checkpoint 120 $py -m pdlaunch bench make-checkpoint "$ckpt" --device cuda
}

# `serve_round NAME ARGS...`: one `pdlaunch serve` deployment in the background, ready within 300 s, then
# `bench serve` with $BENCH_ARGS, then the deployment stopped (SIGTERM, 60 s, then SIGKILL) and reaped.
serve_round() {
    local name=$1; shift
    $py -m pdlaunch serve --model "$ckpt" --port $port --log-dir "$out/logs-$name" "$@" > "$out/serve-$name.log" 2>&1 &
    local pid=$!
    if wait_ready $port $pid 300; then
        if [ -n "${WARM_BENCH:-}" ]; then  # WARM_BENCH=1: the same bench once before, another seed, reported apart
            TAIL=6 step "bench-$name-first" 240 $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port $BENCH_ARGS \
                --seed 1001 --save-result --result-dir "$out" --result-filename "$name-first.json"
        fi
        $py benchmarks/serve_probe.py snap http://127.0.0.1:$port "$out/probe-$name-0.json"
        times > "$out/times-$name-0"
        if [ -n "${SPY:-}" ]; then  # SPY=py-spy's path: each instance's Python stacks over the bench's first seconds
            for url in $(curl -s "http://127.0.0.1:$port/instances" | $py -c \
                    'import json,sys; print(" ".join(i["url"] for i in json.load(sys.stdin)))'); do
                ipid=$(curl -s "$url/info" | $py -c 'import json,sys; print(json.load(sys.stdin)["pid"])')
                "$SPY" record -p "$ipid" -d "${SPY_SECONDS:-6}" -r 500 -f raw --threads ${SPY_GIL:+--gil} --nonblocking \
                    -o "$out/spy-$name-${url##*:}.txt" > /dev/null 2>&1 &
            done
        fi
        TAIL=24 step "bench-$name" 240 $py -m pdlaunch bench serve --base-url http://127.0.0.1:$port $BENCH_ARGS \
            --save-result --result-dir "$out" --result-filename "$name.json"
        times > "$out/times-$name-1"
        echo "== this shell's children's CPU (user, sys) before and after the bench, the difference the bench client's:" \
            "$(tail -1 "$out/times-$name-0") -> $(tail -1 "$out/times-$name-1")"
        $py benchmarks/serve_probe.py snap http://127.0.0.1:$port "$out/probe-$name-1.json"
        $py benchmarks/serve_probe.py diff "$out/probe-$name-0.json" "$out/probe-$name-1.json"
    else
        tail -20 "$out/serve-$name.log"
    fi
    stop_server $pid
}

case $part in
kv)
    kv=(--device cuda:0 --decode-device cuda:1 --num-tokens 1024 --num-tokens 8192 --mode pull --mode push
        --iterations 15)
    TAIL=12 step kv-bf16 240 $py -m pdlaunch bench kv-transfer "${kv[@]}" --json "$out/kv-bf16.json"
    TAIL=12 step kv-fp8 240 $py -m pdlaunch bench kv-transfer "${kv[@]}" --kv-cache-dtype fp8 --json "$out/kv-fp8.json"
    ;;
compare)
    need_8b
    TAIL=40 step compare 500 $py -m pdlaunch bench compare --model "$ckpt" --gpus 0,1 --rates "${RATES:-4,6}" \
        --num-prompts 64 --input-len 3072 --output-len 128 ${COMPARE_CONFIG:+--config "$COMPARE_CONFIG"} \
        --out "$out/compare"
    ;;
mixed)
    need_8b
    count=(--num-prompts "${NUM_PROMPTS:-64}")
    [ -n "${DURATION:-}" ] && count=(--duration "$DURATION")
    TAIL=40 step mixed 520 $py -m pdlaunch bench compare --model "$ckpt" --gpus 0,1 --rates "${RATES:-4,8}" \
        "${count[@]}" --input-lens 64,3072 --output-len 128 --disaggregate-min-tokens 256 \
        ${MAX_QUEUE:+--disaggregate-max-queue-tokens "$MAX_QUEUE"} ${MAX_ITL:+--disaggregate-max-itl-ms "$MAX_ITL"} \
        ${COMPARE_CONFIG:+--config "$COMPARE_CONFIG"} ${BASELINE:+--baseline "$BASELINE"} \
        --no-run-advised --out "$out/mixed"
    ;;
mixed-sweep)
    BASELINE= bash "$0" "$out" mixed || exit 1
    for qt in ${SWEEP:?SWEEP: Q:T pairs, e.g. 8192: 6144:9}; do  # the mixed part again, beside the first run
        BASELINE="$out/mixed" MAX_QUEUE=${qt%%:*} MAX_ITL=${qt#*:} bash "$0" "$out/sweep-${qt/:/-}" mixed
        # a device call brings back files only a few folders deep: each variant's table beside the first run's
        cp "$out/sweep-${qt/:/-}/mixed/compare.json" "$out/sweep-${qt/:/-}.json" 2> /dev/null ||
            echo "== sweep ${qt}: no compare.json"
    done
    ;;
mixed-caps)
    for cap in ${CAPS:?CAPS: prompt-token caps, e.g. 360 1024}; do
        printf 'scheduler:\n  prompt_tokens_while_decoding: %s\n' "$cap" > "$out/cap-$cap.yaml"
        BASELINE= COMPARE_CONFIG="$out/cap-$cap.yaml" bash "$0" "$out/cap-$cap" mixed
        cp "$out/cap-$cap/mixed/compare.json" "$out/cap-$cap.json" 2> /dev/null || echo "== cap $cap: no compare.json"
    done
    ;;
multiturn)
    need_8b
    # Conversations start 4 a second: started together (this session's first runs) they turn in lockstep, and
    # TTFT p50 measured each turn's burst as much as the policy (RESULTS, twenty-seventh session).
    BENCH_ARGS=${MT_ARGS:-"--multi-turn --num-conversations 16 --num-turns 4 --system-prompt-len 1024
        --random-input-len 256 --random-output-len 128 --request-rate 4"}
    # With one decode, round robin reaches the decode that holds the conversation too, so decode-side reuse
    # serves it as well: the first run, without prefix caching, is what every turn cost before issue 31.
    [ -n "${MT_SKIP_NO_REUSE:-}" ] || serve_round multiturn-no-reuse --prefill 1 --decode 1 --routing-policy round_robin --no-enable-prefix-caching ${MT_EXTRA:-}
    [ -n "${MT_SKIP_ROUND_ROBIN:-}" ] || serve_round multiturn-round-robin --prefill 1 --decode 1 --routing-policy round_robin ${MT_EXTRA:-}
    [ -n "${MT_SKIP_PREFIX:-}" ] || serve_round multiturn-prefix --prefill 1 --decode 1 --routing-policy prefix ${MT_EXTRA:-}
    # ... and with per-request disaggregation: a turn whose conversation the decode holds runs there alone
    # (its new user tokens, fewer than MT_MIN_TOKENS, are all it lacks), so only first turns move KV.
    serve_round multiturn-prefix-decode-only --prefill 1 --decode 1 --routing-policy prefix \
        --disaggregate-min-tokens "${MT_MIN_TOKENS:-512}" ${MT_EXTRA:-}
    ;;
turns1)
    need_8b
    BENCH_ARGS=${MT_ARGS:-"--multi-turn --num-conversations 16 --num-turns 4 --system-prompt-len 1024
        --random-input-len 64 --random-output-len 256 --request-rate 4"}
    serve_round turns1-loaded --colocated
    [ -n "${SKIP_ALONE:-}" ] || BENCH_ARGS="--multi-turn --num-conversations 1 --num-turns 6 --system-prompt-len 1024 --random-input-len 64
        --random-output-len 256" serve_round turns1-alone --colocated
    ;;
moe)
    [ -f "$moe_ckpt/config.json" ] || step moe-checkpoint 300 $py -m pdlaunch bench make-checkpoint \
        --shape qwen3-30b-a3b --device cuda "$moe_ckpt"
    TAIL=40 step moe-compare 500 $py -m pdlaunch bench compare --model "$moe_ckpt" --gpus 0,1 --rates "${RATES:-2,4,6,8}" \
        --num-prompts 48 --input-len 3072 --output-len 128 --advise-for tight --no-run-advised --out "$out/moe"
    ;;
*)
    echo "unknown PART $part: kv | compare | mixed | mixed-sweep | mixed-caps | multiturn | moe | turns1"; exit 2
    ;;
esac
