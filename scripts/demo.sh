#!/usr/bin/env bash
# The demo: two backends, baton in front of them (config.yaml), HTTP clients and long-lived
# TCP tunnels busy through it, three live upgrades under that load, and what the clients saw.
# Everything started here is stopped by pid at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d)
PIDS=()
cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    if [[ -f baton.pid ]]; then kill "$(cat baton.pid)" 2>/dev/null || true; fi
}
trap cleanup EXIT

for port in 18080 15000 9101 9102 9201 9202; do
    if (exec 3<>/dev/tcp/127.0.0.1/$port) 2>/dev/null; then
        echo "port $port is already in use on 127.0.0.1; stop whatever uses it first" >&2
        exit 1
    fi
done

echo "== building baton and the demo programs (release)"
cargo build --release --quiet --bin baton --example backend --example loadgen
BATON=$ROOT/target/release/baton
EX=$ROOT/target/release/examples

echo "== starting backends a and b"
"$EX/backend" --listen 127.0.0.1:9101 --name a --echo 127.0.0.1:9201 2>"$WORK/a.log" & PIDS+=($!)
"$EX/backend" --listen 127.0.0.1:9102 --name b --echo 127.0.0.1:9202 2>"$WORK/b.log" & PIDS+=($!)

echo "== checking and starting baton with config.yaml"
"$BATON" check -c config.yaml
"$BATON" run -c config.yaml 2>"$WORK/baton.log" &
for _ in $(seq 100); do
    "$BATON" status -c config.yaml >/dev/null 2>&1 && break
    sleep 0.1
done
"$BATON" status -c config.yaml

echo "== one request each way"
printf 'GET / HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' | timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18080; cat >&3; cat <&3' | tail -1
printf 'GET /b HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' | timeout 5 bash -c 'exec 3<>/dev/tcp/127.0.0.1/18080; cat >&3; cat <&3' | tail -1

echo "== load: 16 keep-alive HTTP clients, 4 clients with a new connection per request, 20 TCP tunnels (14 s)"
"$EX/loadgen" --http 127.0.0.1:18080 --conns 16 --tunnels 127.0.0.1:15000 --tunnel-conns 20 --seconds 14 \
    >"$WORK/load1.txt" 2>"$WORK/load1.err" & L1=$!
"$EX/loadgen" --http 127.0.0.1:18080 --conns 4 --close --seconds 14 \
    >"$WORK/load2.txt" 2>"$WORK/load2.err" & L2=$!
PIDS+=($L1 $L2)
sleep 2
for i in 1 2 3; do
    echo "-- upgrade $i (old pid $(cat baton.pid))"
    "$BATON" upgrade -c config.yaml
    sleep 3
done
status=0
wait $L1 || status=1
wait $L2 || status=1

echo "== what the clients saw"
echo "keep-alive + tunnels: $(cat "$WORK/load1.txt")"
echo "connection per request: $(cat "$WORK/load2.txt")"
if [[ -s "$WORK/load1.err" || -s "$WORK/load2.err" ]]; then
    echo "client errors:"; head -5 "$WORK/load1.err" "$WORK/load2.err"
fi
echo "== baton now"
"$BATON" status -c config.yaml
"$BATON" stop -c config.yaml
if [[ $status -eq 0 ]]; then
    echo "RESULT: PASS — three live upgrades under load, no client noticed (baton log: $WORK/baton.log)"
else
    echo "RESULT: FAIL — a client saw an error (baton log: $WORK/baton.log)"
fi
exit $status
