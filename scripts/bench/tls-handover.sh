#!/usr/bin/env bash
# Handing over idle keep-alive connections, plain HTTP beside HTTPS: baton (release) with an
# `http` listener and an `http` listener with `tls:` (TLS 1.3, ECDSA P-256, self-signed) in
# front of the example backend; scripts/bench/idle.py holds N idle connections on one of them
# (each answered once), then ROUNDS upgrades with `baton upgrade --wait` (returns when the old
# process has exited). Per kind it prints the RSS per idle connection, and per round the wall
# time of the upgrade (trigger → old process gone), baton's own "N ... handed over" and
# "accepting paused X ms, Y ms"; then the clients' verdict (every connection must answer a
# request after the upgrades). Everything started is stopped by pid on exit.
#
#   scripts/bench/tls-handover.sh [N=1000] [ROUNDS=3]
#   BENCH_NO_BUILD=1 uses target/release as it is; BATON_BIN=PATH / BACKEND_BIN=PATH run those binaries;
#   HANDOVER_KINDS="plain tls"
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
N=${1:-1000}
ROUNDS=${2:-3}
BIN=${BATON_BIN:-$ROOT/target/release/baton}
BACKEND=${BACKEND_BIN:-$ROOT/target/release/examples/backend}
[[ -n ${BENCH_NO_BUILD:-} ]] || cargo build --release --locked --bin baton --example backend >&2
WORK=$(mktemp -d /tmp/baton-tlsho.XXXXXX)
PIDS=()
cleanup() {
    [[ -f "$WORK/config.yaml" ]] && "$BIN" stop -c "$WORK/config.yaml" >/dev/null 2>&1 || true
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
}
trap cleanup EXIT
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
free_port() { python3 -c 'import socket;s=socket.socket();s.bind(("127.0.0.1",0));print(s.getsockname()[1])'; }
wait_for() { # wait_for SECONDS COMMAND...: polls until COMMAND succeeds
    local until=$((SECONDS + $1)); shift
    until "$@"; do ((SECONDS < until)) || return 1; sleep 0.1; done
}
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 2 \
    -subj /CN=localhost -addext "subjectAltName=DNS:localhost,IP:127.0.0.1" \
    -keyout "$WORK/key.pem" -out "$WORK/cert.pem" 2>/dev/null
BPORT=$(free_port) HPORT=$(free_port) SPORT=$(free_port)
"$BACKEND" --listen "127.0.0.1:$BPORT" --name a 2>"$WORK/backend.log" & PIDS+=($!)
cat >"$WORK/config.yaml" <<YAML
runtime:
  pid_file: $WORK/baton.pid
  control_socket: $WORK/baton.sock
  upgrade_timeout: 20s
  drain_timeout: 5s
listeners:
  web:
    listen: 127.0.0.1:$HPORT
    protocol: http
    upstream: app
    max_connections: $((N + 100))
    backlog: 4096
  web_tls:
    listen: 127.0.0.1:$SPORT
    protocol: http
    upstream: app
    max_connections: $((N + 100))
    backlog: 4096
    tls:
      certificates:
        - { cert: $WORK/cert.pem, key: $WORK/key.pem }
      min_version: "1.3"
upstreams:
  app:
    servers: ["127.0.0.1:$BPORT"]
YAML
"$BIN" run -c "$WORK/config.yaml" 2>"$WORK/baton.log" & PIDS+=($!)
wait_for 10 grep -q "to=Ready" "$WORK/baton.log"
echo "machine: $(nproc) CPUs, load average $(cut -d' ' -f1-3 /proc/loadavg); $N idle connections per kind; $("$BIN" --version 2>&1 | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?'))"
for kind in ${HANDOVER_KINDS:-plain tls}; do
    port=$HPORT tls=()
    [[ $kind == tls ]] && port=$SPORT tls=(--tls)
    pid=$(cat "$WORK/baton.pid")
    before=$(rss_kib "$pid")
    rm -f "$WORK/ready"
    python3 "$ROOT/scripts/bench/idle.py" "127.0.0.1:$port" "$N" "${tls[@]}" --ready-file "$WORK/ready" \
        --max-seconds 300 >"$WORK/idle-$kind.out" 2>&1 & CONNS=$!
    PIDS+=("$CONNS")
    wait_for 200 test -s "$WORK/ready"
    sleep 1
    loaded=$(rss_kib "$pid")
    awk -v k="$kind" -v n="$N" -v b="$before" -v l="$loaded" 'BEGIN {
        printf "%s: RSS %.1f MiB before, %.1f MiB with the connections: %.1f KiB per idle connection\n", k, b / 1024, l / 1024, (l - b) / n }'
    for _ in $(seq "$ROUNDS"); do
        t0=$(date +%s%N)
        out=$("$BIN" upgrade --wait -c "$WORK/config.yaml")
        [[ -z ${HANDOVER_DEBUG:-} ]] || printf "%s\n" "$out" >&2
        t1=$(date +%s%N)
        printf '%s: upgrade --wait %d ms; %s\n' "$kind" $(((t1 - t0) / 1000000)) \
            "$(grep -o -e "[0-9]* idle http and [0-9]* busy http" -e "([0-9]* over tls)" -e "accepting paused [0-9]* ms, [0-9]* ms" <<<"$out" | paste -sd' ')"
    done
    kill -USR1 "$CONNS"
    wait "$CONNS" || true
    python3 -c 'import json,sys; d=json.loads(open(sys.argv[1]).read().strip().splitlines()[-1]); print(sys.argv[2] + ": clients:", d["verified_ok"], "of", d["established"], "idle connections answered after the upgrades,", d["errors"], "errors", d["error_samples"][:1])' "$WORK/idle-$kind.out" "$kind"
done
