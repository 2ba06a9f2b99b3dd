#!/usr/bin/env bash
# How long an upgrade stops accepting, with many idle keep-alive HTTP connections to move:
# baton (release) in front of the example backend, scripts/bench/conns.py holding N idle
# connections (each answered once), then ROUNDS upgrades. Per round it prints how many idle
# connections moved before the commit and baton's own "accepting paused X ms, Y ms" (the pause,
# the whole upgrade); then the clients' verdict (every idle connection must still answer).
# Everything started is stopped by pid on exit.
#
#   scripts/bench/accept-pause.sh [N=5000] [ROUNDS=3]
#   BENCH_NO_BUILD=1 uses target/release as it is; BATON_BIN=PATH runs that binary instead
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-5000}
ROUNDS=${2:-3}
BIN=${BATON_BIN:-$ROOT/target/release/baton}
BACKEND=$ROOT/target/release/examples/backend
[[ -n ${BENCH_NO_BUILD:-} ]] || cargo build --release --locked --bin baton --example backend >&2
WORK=$(mktemp -d /tmp/baton-pause.XXXXXX)
PIDS=()
cleanup() {
    "$BIN" stop -c "$WORK/config.yaml" >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS COMMAND...: polls until COMMAND succeeds
    local until=$((SECONDS + $1)); shift
    until "$@"; do ((SECONDS < until)) || return 1; sleep 0.1; done
}
BPORT=$(free_port)
PPORT=$(free_port)
"$BACKEND" --listen "127.0.0.1:$BPORT" --name a 2>"$WORK/backend.log" & PIDS+=($!)
cat >"$WORK/config.yaml" <<YAML
runtime:
  upgrade_timeout: 20s
  drain_timeout: 5s
listeners:
  web:
    listen: 127.0.0.1:$PPORT
    protocol: http
    upstream: app
upstreams:
  app:
    servers: ["127.0.0.1:$BPORT"]
YAML
"$BIN" run -c "$WORK/config.yaml" 2>"$WORK/baton.log" & PIDS+=($!)
wait_for 10 grep -q "to=Ready" "$WORK/baton.log"
python3 "$ROOT/scripts/bench/conns.py" --idle "127.0.0.1:$PPORT" "$N" --ready-file "$WORK/ready" \
    --max-seconds 300 >"$WORK/conns.out" 2>&1 & CONNS=$!
PIDS+=("$CONNS")
wait_for 120 test -s "$WORK/ready"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $N idle connections"
for _ in $(seq "$ROUNDS"); do
    # How many moved before the commit (the rest would move after it), and the pause.
    "$BIN" upgrade -c "$WORK/config.yaml" |
        grep -o -e "[0-9]* idle http" -e "accepting paused [0-9]* ms, [0-9]* ms" | paste -sd' '

done
kill -USR1 "$CONNS"
wait "$CONNS" || true
python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print("clients:", d["idle_verified_ok"], "of", d["idle"], "idle connections answered after the upgrades,", d["errors"], "errors")' "$WORK/conns.out"
