#!/usr/bin/env bash
# What HTTP/2 clients see when the proxy's process is replaced under them: the httpx clients of
# tests/upgrade_h2_clients.rs (tests/scripts/httpx_h2.py: one sequential, one multiplexing 10
# requests at a time, both h2c with prior knowledge) run against
#   1. nginx (`listen ... http2` on a plain port) through ROUNDS (20) `nginx -s reload`,
#   2. baton through ROUNDS `baton upgrade`,
# one every GAP (0.5) seconds, both proxying to the same nginx backend (`return 200`). Prints
# a Markdown table: requests and errors per client, and where httpcore raised the errors.
# Each run is bounded (ROUNDS × GAP plus the reloads themselves, about 10-20 s).
#
# PROXIES ("nginx baton") picks which run; BATON_BIN the baton binary (default
# target/release/baton, built unless BENCH_NO_BUILD=1); BATON_LOG_LEVEL its log filter (warn;
# "warn,baton::proxy=debug" logs how each h2 connection ended, in baton/baton.log);
# BENCH_PORT_BASE (18500) moves the ports; BENCH_KEEP=1 keeps the folder.
# Everything started here is stopped by pid at the end; traffic stays on 127.0.0.1.
set -uo pipefail

# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"

ROUNDS="${ROUNDS:-20}"
GAP="${GAP:-0.5}"
BASE="${BENCH_PORT_BASE:-18500}"
P_BACKEND=$BASE P_TCP=$((BASE + 1)) P_HTTP=$((BASE + 2)) P_NGINX=$((BASE + 3))
CLIENT="$ROOT/tests/scripts/httpx_h2.py"
PROXIES="${PROXIES:-nginx baton}"

python3 -c 'import httpx, h2' 2>/dev/null || die "needs python3 with httpx[http2] (pip install 'httpx[http2]')"
if [[ -n "${BATON_BIN:-}" ]]; then
    BENCH_NO_BUILD=1
fi
bench_start
[[ -n "${BATON_BIN:-}" ]] && BATON="$BATON_BIN"
require_free_ports "$P_BACKEND" "$P_TCP" "$P_HTTP" "$P_NGINX"
start_backend "$P_BACKEND" 0

# nginx as an h2c front: HTTP/2 with prior knowledge on a plain port.
start_nginx_h2c() {
    local d="$WORK/nginx-h2c"
    mkdir -p "$d/logs"
    cat >"$d/nginx.conf" <<EOF
user root;
daemon off;
master_process on;
worker_processes 1;
pid $d/nginx.pid;
error_log $d/logs/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path $WORK/tmp/h_body;
    proxy_temp_path $WORK/tmp/h_proxy;
    fastcgi_temp_path $WORK/tmp/h_fcgi;
    uwsgi_temp_path $WORK/tmp/h_uwsgi;
    scgi_temp_path $WORK/tmp/h_scgi;
    keepalive_timeout 600s;
    upstream bh { server 127.0.0.1:$P_BACKEND; keepalive 16; }
    server {
        listen 127.0.0.1:$P_NGINX http2;
        location / {
            proxy_pass http://bh;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }
    }
}
EOF
    nginx -t -q -p "$d" -c "$d/nginx.conf" >&2 || die "nginx h2c config test failed"
    nginx -p "$d" -c "$d/nginx.conf" >"$d/logs/stderr" 2>&1 &
    NGINX_H2C_PID=$!
    track "$NGINX_H2C_PID"
    local i
    for ((i = 0; i < 300; i++)); do
        curl -fs -o /dev/null --max-time 1 --http2-prior-knowledge "http://127.0.0.1:$P_NGINX/" && return 0
        sleep 0.1
    done
    die "nginx h2c did not answer"
}

# run_clients NAME URL COMMAND...: the clients against URL while COMMAND runs ROUNDS times, GAP
# seconds apart; the clients' JSON line in $WORK/NAME.json, the commands' failures counted.
run_clients() {
    local name=$1 url=$2 i failed=0
    shift 2
    local stop="$WORK/stop-$name"
    coproc CLIENTS { exec timeout 120 python3 "$CLIENT" "$url" "$stop"; }
    local cpid=$CLIENTS_PID
    track "$cpid"
    local line
    read -r -u "${CLIENTS[0]}" line
    [[ "$line" == ready ]] || die "$name clients did not start: $line"
    sleep 1
    for ((i = 0; i < ROUNDS; i++)); do
        "$@" >>"$WORK/$name-commands.out" 2>&1 || failed=$((failed + 1))
        sleep "$GAP"
    done
    sleep 1
    : >"$stop"
    read -r -u "${CLIENTS[0]}" line
    wait "$cpid" 2>/dev/null
    echo "$line" >"$WORK/$name.json"
    echo "$failed" >"$WORK/$name.failed"
}

row() {
    local name=$1 what=$2
    python3 - "$WORK/$name.json" "$(cat "$WORK/$name.failed")" "$what" <<'EOF'
import json, sys
v = json.load(open(sys.argv[1]))
for client in ("sequential", "multiplexed"):
    c = v[client]
    where = ", ".join(f"{k} {n}" for k, n in sorted(c["where"].items())) or "-"
    kinds = "; ".join(sorted({e.split(" last_stream_id")[0].rstrip(",") for e in c["errors"]})) or "-"
    print(f"| {sys.argv[3]} | {client} | {c['requests']} | {c['error_count']} | {where} | {kinds} | {sys.argv[2]} |")
EOF
}

if [[ " $PROXIES " == *" nginx "* ]]; then
    start_nginx_h2c
    NG="$WORK/nginx-h2c"
    log "nginx: $ROUNDS reloads"
    run_clients nginx "http://127.0.0.1:$P_NGINX/" nginx -p "$NG" -c "$NG/nginx.conf" -s reload
fi
if [[ " $PROXIES " == *" baton "* ]]; then
    BATON_DRAIN=10s start_baton "" "$P_TCP" "$P_HTTP" "$P_BACKEND" 1000
    log "baton: $ROUNDS upgrades"
    run_clients baton "http://127.0.0.1:$P_HTTP/" timeout 60 "$BATON" upgrade -c "$WORK/baton/baton.yaml"
fi

echo "## HTTP/2 clients across process replacement ($(date -u '+%Y-%m-%d %H:%M UTC'), load average $(load_avg))"
echo
echo "$ROUNDS replacements, one every $GAP s; httpx $(python3 -c 'import httpx; print(httpx.__version__)'), httpcore $(python3 -c 'import httpcore; print(httpcore.__version__)'), h2 $(python3 -c 'import h2; print(h2.__version__)'); $(nginx -v 2>&1 | sed 's/^nginx version: //'); baton $BATON."
echo
echo "| proxy, replaced by | client | requests | errors | where httpcore raised them | errors seen | reloads/upgrades failed |"
echo "|---|---|---:|---:|---|---|---:|"
[[ ! -f "$WORK/nginx.json" ]] || row nginx "nginx, \`nginx -s reload\`"
[[ ! -f "$WORK/baton.json" ]] || row baton "baton, \`baton upgrade\`"
