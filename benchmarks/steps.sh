# Sourced by the one-call GPU round scripts (round3_grid.sh, moe_round.sh): OUT_DIR from $1, the python to
# run, the commit and device printed, and `step NAME LIMIT_S CMD...`, which runs CMD under a time limit
# (so a call ends inside the device's 10 minutes), logs it to OUT_DIR/NAME.log and prints its tail
# (TAIL lines, default 9) with its exit status and the seconds since the start. LOGS=DIR: the logs go there
# instead (a device's $OUT brings back only so many files: keep the JSON there, the logs elsewhere).
set -u
out=${1:?OUT_DIR}
logs=${LOGS:-$out}
mkdir -p "$out" "$logs"
py=${PYTHON:-python3}
echo "== commit $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)"
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
step() {
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$logs/$name.log" 2>&1
    echo "== $name rc $? at $((SECONDS - t0)) s"; tail -"${TAIL:-9}" "$logs/$name.log"
}
# `wait_ready PORT PID LIMIT_S`: poll http://127.0.0.1:PORT/v1/models until it answers 200; fail early if PID
# (the server) exits, or after LIMIT_S seconds, saying which.
wait_ready() {
    local port=$1 pid=$2 limit=$3 start=$SECONDS
    while (( SECONDS - start < limit )); do
        curl -sf "http://127.0.0.1:$port/v1/models" > /dev/null && { echo "== ready at $((SECONDS - t0)) s"; return 0; }
        kill -0 "$pid" 2> /dev/null || { echo "== the server (pid $pid) exited before it was ready"; return 1; }
        sleep 1
    done
    echo "== the server was not ready after $limit s"; return 1
}
# `stop_server PID`: SIGTERM a server this shell started, SIGKILL it if it has not exited within 60 s, and reap it.
stop_server() {
    local pid=$1
    kill -TERM "$pid" 2> /dev/null
    timeout 60 tail --pid="$pid" -f /dev/null || kill -KILL "$pid"
    wait "$pid" 2> /dev/null
}
