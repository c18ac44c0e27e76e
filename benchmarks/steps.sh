# Sourced by the one-call GPU round scripts (round3_grid.sh, moe_round.sh): OUT_DIR from $1, the python to
# run, the commit and device printed, and `step NAME LIMIT_S CMD...`, which runs CMD under a time limit
# (so a call ends inside the device's 10 minutes), logs it to OUT_DIR/NAME.log and prints its tail
# (TAIL lines, default 9) with its exit status and the seconds since the start.
set -u
out=${1:?OUT_DIR}
mkdir -p "$out"
py=${PYTHON:-python3}
echo "== commit $(git rev-parse --short HEAD 2>/dev/null || cat COMMIT 2>/dev/null)"
nvidia-smi --query-gpu=name --format=csv,noheader
t0=$SECONDS
step() {
    local name=$1 limit=$2; shift 2
    timeout "$limit" "$@" > "$out/$name.log" 2>&1
    echo "== $name rc $? at $((SECONDS - t0)) s"; tail -"${TAIL:-9}" "$out/$name.log"
}
