#!/usr/bin/env bash
# baton against HAProxy and nginx, side by side on this machine (docs/BENCHMARKS.md).
#
#   scripts/bench.sh            throughput: interleaved wrk rounds, Markdown tables on stdout
#   scripts/bench.sh memory     RSS idle, with many idle client connections, with active tunnels
#   scripts/bench.sh tls        HTTPS throughput: the same wrk rounds over TLS 1.3 (AES-128-GCM, one
#                               ECDSA P-256 certificate for every proxy; "close" = a new TLS
#                               connection per request)
#
# Installs wrk, haproxy, nginx (+ its stream module) from Debian if missing, builds baton in
# release mode, starts a fast nginx backend (`return 200 "ok\n"`, keep-alive) on 127.0.0.1 from
# a temporary prefix, and the proxies from generated configs. Each proxy runs one thread / one
# worker pinned to CPU $BENCH_PROXY_CPU (0); wrk and the backend share CPU $BENCH_LOAD_CPU (1).
# Everything started is stopped by pid on exit; all traffic is on 127.0.0.1; every run is bounded.
#
# Environment:
#   BENCH_SECONDS=8      duration of each wrk run
#   BENCH_ROUNDS=3       interleaved rounds (A B C … A B C …); medians are reported
#   BENCH_CONNS=64       wrk connections
#   BENCH_TARGETS="direct baton-tcp baton-http haproxy-tcp haproxy-http nginx-stream nginx-http"
#                        (tls mode: "baton-https haproxy-https nginx-https")
#   BENCH_CASES="keepalive close"
#   BENCH_PORT_BASE=18400  ports BASE..BASE+6 (tls mode: BASE..BASE+9) on 127.0.0.1 must be free
#   BENCH_RAW=FILE       also keep the raw per-run lines in FILE
#   BENCH_NO_BUILD=1     use target/release/baton as it is
#   BENCH_KEEP=1         keep the temporary folder (configs, logs)
#   memory mode: MEM_IDLE_HTTP=9500 MEM_IDLE_HTTPS=2000 MEM_IDLE_TCP=4000 MEM_ACTIVE=1000 MEM_STALLED=200 (connection
#   counts; HAProxy cannot start with maxconn ≥ 9,890 under a 20,000 fd limit, and an L4 proxy
#   needs 2 fds a tunnel); MEM_PROXIES="baton haproxy nginx";
#   MEM_KINDS="idle-http idle-https idle-tcp active-tcp stalled-http"
#
# Quick smoke run: BENCH_SECONDS=2 BENCH_ROUNDS=1 scripts/bench.sh
set -uo pipefail

# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/bench/lib.sh"

MODE="${1:-throughput}"
SECS="${BENCH_SECONDS:-8}"
ROUNDS="${BENCH_ROUNDS:-3}"
CONNS="${BENCH_CONNS:-64}"
if [[ "${1:-}" == tls ]]; then
    TARGETS="${BENCH_TARGETS:-baton-https haproxy-https nginx-https}"
else
    TARGETS="${BENCH_TARGETS:-direct baton-tcp baton-http haproxy-tcp haproxy-http nginx-stream nginx-http}"
fi
CASES="${BENCH_CASES:-keepalive close}"
BASE="${BENCH_PORT_BASE:-18400}"
PCPU="${BENCH_PROXY_CPU:-0}"
LCPU="${BENCH_LOAD_CPU:-1}"

P_BACKEND=$BASE
P_BATON_TCP=$((BASE + 1)) P_BATON_HTTP=$((BASE + 2))
P_HAPROXY_TCP=$((BASE + 3)) P_HAPROXY_HTTP=$((BASE + 4))
P_NGINX_TCP=$((BASE + 5)) P_NGINX_HTTP=$((BASE + 6))
P_BATON_HTTPS=$((BASE + 7)) P_HAPROXY_HTTPS=$((BASE + 8)) P_NGINX_HTTPS=$((BASE + 9))

case "$MODE" in
throughput | memory | tls) ;;
-h | --help | help)
    sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//; /^set -uo/d'
    exit 0
    ;;
*) die "unknown mode '$MODE' (expected: throughput, memory or tls)" ;;
esac
[[ "$SECS" =~ ^[0-9]+$ && "$SECS" -ge 1 ]] || die "BENCH_SECONDS must be a whole number ≥ 1"
[[ "$ROUNDS" =~ ^[0-9]+$ && "$ROUNDS" -ge 1 ]] || die "BENCH_ROUNDS must be a whole number ≥ 1"
[[ $(nproc) -ge 2 ]] || log "warning: fewer than 2 CPUs: the proxy and the load generator share one"

bench_start
require_free_ports "$P_BACKEND" "$P_BATON_TCP" "$P_BATON_HTTP" "$P_HAPROXY_TCP" "$P_HAPROXY_HTTP" \
    "$P_NGINX_TCP" "$P_NGINX_HTTP"
MEM_KINDS="${MEM_KINDS:-idle-http idle-https idle-tcp active-tcp stalled-http}"
if [[ "$MODE" == tls || ( "$MODE" == memory && " $MEM_KINDS " == *" idle-https "* ) ]]; then
    require_free_ports "$P_BATON_HTTPS" "$P_HAPROXY_HTTPS" "$P_NGINX_HTTPS"
    make_cert
    TLS_PORT_BATON=$P_BATON_HTTPS TLS_PORT_HAPROXY=$P_HAPROXY_HTTPS TLS_PORT_NGINX=$P_NGINX_HTTPS
fi

# target -> "port pid-variable"
target_port() {
    case "$1" in
    direct) echo "$P_BACKEND" ;;
    baton-tcp) echo "$P_BATON_TCP" ;;
    baton-http) echo "$P_BATON_HTTP" ;;
    haproxy-tcp) echo "$P_HAPROXY_TCP" ;;
    haproxy-http) echo "$P_HAPROXY_HTTP" ;;
    nginx-stream) echo "$P_NGINX_TCP" ;;
    nginx-http) echo "$P_NGINX_HTTP" ;;
    baton-https) echo "$P_BATON_HTTPS" ;;
    haproxy-https) echo "$P_HAPROXY_HTTPS" ;;
    nginx-https) echo "$P_NGINX_HTTPS" ;;
    *) die "unknown target '$1'" ;;
    esac
}
target_pid() {
    case "$1" in
    direct) echo "" ;;
    baton-*) echo "$BATON_PID" ;;
    haproxy-*) echo "$HAPROXY_PID" ;;
    nginx-*) echo "$NGINX_PID" ;;
    esac
}

# The URL wrk loads for a target; over TLS, wrk's OpenSSL is held to TLS 1.3 and AES-128-GCM
# by $WORK/tls/client.cnf (OPENSSL_CONF), so every proxy negotiates the same suite.
target_url() {
    case "$1" in
    *-https) echo "https://127.0.0.1:$(target_port "$1")/" ;;
    *) echo "http://127.0.0.1:$(target_port "$1")/" ;;
    esac
}
wrk_env() { [[ "$MODE" == tls ]] && echo "OPENSSL_CONF=$WORK/tls/client.cnf"; }

versions() {
    echo "- baton: $("$BATON" --version 2>&1 | head -1) ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')), $(rustc -V 2>/dev/null)"
    echo "- $(haproxy -v 2>&1 | head -1)"
    echo "- $(nginx -v 2>&1 | head -1)"
    echo "- $(wrk -v 2>&1 | head -1)"
    echo "- kernel $(uname -r), $(nproc) CPUs: $(lscpu | awk -F: '/^Model name/ {gsub(/^ +/, "", $2); print $2}')"
}

# One wrk run; appends a key=value line to $RAW.
run_one() {
    local round=$1 case=$2 target=$3 pid before after out line hdr=()
    pid=$(target_pid "$target")
    [[ "$case" == close ]] && hdr=(-H 'Connection: close')
    [[ -z "$pid" || -d /proc/$pid ]] || die "$target: its process $pid is gone (logs in $WORK)"
    before=$([[ -n "$pid" ]] && cpu_ticks "$pid" || echo 0)
    out=$(env $(wrk_env) timeout $((SECS + 30)) taskset -c "$LCPU" wrk -t1 -c"$CONNS" -d"${SECS}s" --latency \
        -s "$BENCH_DIR/summary.lua" "${hdr[@]}" "$(target_url "$target")" 2>&1)
    after=$([[ -n "$pid" ]] && cpu_ticks "$pid" || echo 0)
    line=$(grep '^BENCH ' <<<"$out" | head -1)
    if [[ -z "$line" ]]; then
        log "$target/$case: wrk gave no summary:"
        printf '%s\n' "$out" >&2
        return 1
    fi
    echo "round=$round case=$case target=$target ${line#BENCH } cpu_ticks=$((after - before)) clk_tck=$CLK_TCK" >>"$RAW"
    log "round $round $case $target: $(awk '{for(i=1;i<=NF;i++) if ($i ~ /^requests=/) print $i}' <<<"$line") in ${SECS}s"
}

throughput() {
    local n_runs case_count target_count
    RAW="$WORK/raw.txt"
    : >"$RAW"
    start_backend "$P_BACKEND" "$LCPU"
    [[ " $TARGETS " == *" baton-"* ]] && start_baton "$PCPU" "$P_BATON_TCP" "$P_BATON_HTTP" "$P_BACKEND" 4096
    [[ " $TARGETS " == *" haproxy-"* ]] && start_haproxy "$PCPU" "$P_HAPROXY_TCP" "$P_HAPROXY_HTTP" "$P_BACKEND" 4096
    [[ " $TARGETS " == *" nginx-"* ]] && start_nginx "$PCPU" "$P_NGINX_TCP" "$P_NGINX_HTTP" "$P_BACKEND" 4096
    case_count=$(wc -w <<<"$CASES")
    target_count=$(wc -w <<<"$TARGETS")
    n_runs=$((ROUNDS * case_count * target_count))
    log "$n_runs runs of ${SECS}s (≈$((n_runs * (SECS + 1) / 60 + 1)) min); load average $(load_avg)"
    local load_before t
    load_before=$(load_avg)
    # Warm-up (not recorded): fills connection pools and page caches.
    for t in $TARGETS; do
        env $(wrk_env) timeout 30 taskset -c "$LCPU" wrk -t1 -c"$CONNS" -d1s "$(target_url "$t")" >/dev/null 2>&1
    done
    local round case
    for ((round = 1; round <= ROUNDS; round++)); do
        for case in $CASES; do
            for t in $TARGETS; do run_one "$round" "$case" "$t" || die "run failed"; done
        done
    done
    [[ -n "${BENCH_RAW:-}" ]] && cp "$RAW" "$BENCH_RAW"
    echo "## Throughput ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "wrk -t1 -c$CONNS -d${SECS}s --latency, $ROUNDS interleaved rounds, medians; proxies pinned to CPU $PCPU"
    echo "(1 thread / 1 worker), wrk and the backend on CPU $LCPU. Load average before: $load_before, after: $(load_avg)."
    echo "wrk errors are connect/read/write/timeout + responses with status ≥ 400, summed over the rounds."
    echo
    versions
    python3 "$BENCH_DIR/report.py" "$RAW"
}

# --- memory ---

# mem_measure PROXY KIND: starts a fresh PROXY, measures RSS idle, then with the connections of
# KIND (idle-http | idle-tcp | active-tcp) held open; prints one Markdown row.
mem_measure() {
    local proxy=$1 kind=$2 pid tport hport sport n script=conns.py args=() idle loaded ready="$WORK/ready" out i maxconn
    case "$kind" in
    idle-http) n=${MEM_IDLE_HTTP:-9500} ;;
    idle-https) n=${MEM_IDLE_HTTPS:-2000} ;;
    idle-tcp) n=${MEM_IDLE_TCP:-4000} ;;
    active-tcp) n=${MEM_ACTIVE:-1000} ;;
    stalled-http) n=${MEM_STALLED:-200} ;;
    esac
    maxconn=$((n + 100))
    case "$proxy" in
    baton) tport=$P_BATON_TCP hport=$P_BATON_HTTP sport=$P_BATON_HTTPS
        start_baton "$PCPU" "$tport" "$hport" "$P_BACKEND" "$maxconn"; pid=$BATON_PID ;;
    haproxy) tport=$P_HAPROXY_TCP hport=$P_HAPROXY_HTTP sport=$P_HAPROXY_HTTPS
        start_haproxy "$PCPU" "$tport" "$hport" "$P_BACKEND" "$maxconn"; pid=$HAPROXY_PID ;;
    nginx) tport=$P_NGINX_TCP hport=$P_NGINX_HTTP sport=$P_NGINX_HTTPS
        start_nginx "$PCPU" "$tport" "$hport" "$P_BACKEND" "$maxconn"; pid=$NGINX_PID ;;
    esac
    case "$kind" in
    idle-http) args=(--idle "127.0.0.1:$hport" "$n") ;;
    idle-https) args=("127.0.0.1:$sport" "$n" --tls) script=idle.py ;;
    idle-tcp) args=(--idle "127.0.0.1:$tport" "$n") ;;
    active-tcp) args=(--active "127.0.0.1:$tport" "$n" --interval-ms 200) ;;
    stalled-http) args=(--stalled "127.0.0.1:$hport" "$n" --stalled-path /big) ;;
    esac
    sleep 1
    idle=$(rss_kib "$pid")
    rm -f "$ready"
    # --no-verify: a burst of 9,500 requests at once would need 9,500 upstream connections.
    taskset -c "$LCPU" python3 "$BENCH_DIR/$script" "${args[@]}" --no-verify --ready-file "$ready" \
        --max-seconds 120 >"$WORK/conns.out" 2>&1 &
    local cpid=$!
    track "$cpid"
    for ((i = 0; i < 900; i++)); do
        [[ -s "$ready" || ! -d /proc/$cpid ]] && break
        sleep 0.1
    done
    [[ -s "$ready" ]] || { cat "$WORK/conns.out" >&2; die "$proxy $kind: clients not established in 90 s"; }
    sleep 3 # let the active ones run a while, and the proxy settle
    if [[ "$kind" == stalled-http ]]; then
        # The proxy reads each download until its buffers are full, then stops: wait (bounded,
        # 20 s) until its RSS stops growing (less than 64 KiB in 2 s).
        local prev cur
        prev=$(rss_kib "$pid")
        for ((i = 0; i < 10; i++)); do
            sleep 2
            cur=$(rss_kib "$pid")
            ((cur - prev < 64)) && break
            prev=$cur
        done
        # Client connections the proxy still holds, and what waits in its send queues to them.
        ss -Htn state established "sport = :$hport" |
            awk '{n++; q += $2} END {printf "%d open, send queues %.0f KiB each\n", n, n ? q / n / 1024 : 0}' \
                >"$WORK/stalled.ss"
    fi
    loaded=$(rss_kib "$pid")
    kill -USR1 "$cpid" 2>/dev/null
    wait "$cpid" 2>/dev/null
    out=$(tail -1 "$WORK/conns.out")
    local errs
    errs=$(python3 -c 'import json,sys; d=json.loads(sys.argv[1]); print(d["errors"] if not d["errors"] else "%d (%s)" % (d["errors"], d["error_samples"][0]))' "$out" 2>/dev/null || echo "? ($out)")
    [[ "$kind" == stalled-http ]] && errs="$errs; $(cat "$WORK/stalled.ss")"
    stop_pid "$pid"
    rm -f "$WORK/baton.pid"
    awk -v p="$proxy" -v k="$kind" -v n="$n" -v i="$idle" -v l="$loaded" -v e="$errs" 'BEGIN {
        printf "| %s | %s | %d | %.1f MiB | %.1f MiB | %.1f KiB | %s |\n", p, k, n, i / 1024, l / 1024, (l - i) / n, e
    }' >>"$WORK/mem_rows"
}

memory() {
    start_backend "$P_BACKEND" "$LCPU"
    local load_before
    load_before=$(load_avg)
    local p k
    : >"$WORK/mem_rows"
    for p in ${MEM_PROXIES:-baton haproxy nginx}; do
        for k in $MEM_KINDS; do
            log "memory: $p $k"
            mem_measure "$p" "$k"
        done
    done
    echo "## Memory ($(date -u '+%Y-%m-%d %H:%M UTC'))"
    echo
    echo "RSS (VmRSS summed over the proxy's processes) of a freshly started proxy after one request"
    echo "(idle), then with the client connections held open (scripts/bench/conns.py):"
    echo "idle-http = HTTP keep-alive connections idle after one request each (9,500, not 10,000: HAProxy"
    echo "refuses to start with maxconn ≥ 9,890 under this machine's 20,000 fd limit); idle-https = the same over"
    echo "TLS 1.3 (AES-128-GCM, ECDSA P-256; scripts/bench/idle.py, one handshake each); idle-tcp = L4 tunnels"
    echo "idle after one request (each costs an L4 proxy two fds, so fewer fit the 20,000 fd limit);"
    echo "active-tcp = L4 tunnels each sending a request every 200 ms; stalled-http = HTTP clients that each"
    echo "request a 256 MiB download and never read it (receive buffer 16 KiB). Per connection = (loaded − idle) / N."
    echo "Client errors: connections that failed or were closed while held."
    echo "Load average before: $load_before, after: $(load_avg)."
    echo
    versions
    echo
    echo "| proxy | connections | N | RSS idle | RSS loaded | per connection | client errors |"
    echo "|---|---|---:|---:|---:|---:|---|"
    cat "$WORK/mem_rows"
}

case "$MODE" in
tls) throughput ;;
*) "$MODE" ;;
esac
