#!/usr/bin/env bash
# The floor under issue 10's keep-alive CPU target: how little CPU per request an epoll proxy
# and an io_uring proxy can spend on this machine, beside baton and nginx (docs/BENCHMARKS.md).
#
#   scripts/bench/floor.sh
#
# Builds scripts/bench/floor/relay-{epoll,uring}.c (gcc; liburing-dev from Debian if missing):
# byte relays with no HTTP at all, one upstream connection per client, the fewest syscalls
# each model allows. Then runs FLOOR_ROUNDS (5) interleaved rounds of `wrk -t1 -c64
# -d${FLOOR_SECONDS:-6}s` keep-alive against baton-http, nginx-http, the epoll relay and the
# io_uring relay, each pinned to CPU 0 (wrk and the nginx backend on CPU 1), and prints req/s,
# user and system CPU-s per 100k requests, and p99. Uses target/release/baton as it is
# (build it first). Ports FLOOR_PORT_BASE (18800) .. +6 on 127.0.0.1 must be free.
set -uo pipefail
(($# == 0)) || { sed -n 2,13p "$0"; exit 2; }
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"
BENCH_NO_BUILD=1 bench_start
[[ -x "$BATON" ]] || die "$BATON missing: run cargo build --release first"
[[ -e /usr/include/liburing.h ]] || {
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq liburing-dev >&2
} || die "apt-get install liburing-dev failed"
SRC="$BENCH_DIR/floor"
gcc -O2 -Wall -o "$WORK/relay-epoll" "$SRC/relay-epoll.c" || die "cannot build relay-epoll"
gcc -O2 -Wall -o "$WORK/relay-uring" "$SRC/relay-uring.c" -luring || die "cannot build relay-uring"
B="${FLOOR_PORT_BASE:-18800}"
require_free_ports "$B" $((B + 1)) $((B + 2)) $((B + 3)) $((B + 4)) $((B + 5)) $((B + 6))
start_backend "$B" 1
start_baton 0 $((B + 1)) $((B + 2)) "$B" 4096
start_nginx 0 $((B + 3)) $((B + 4)) "$B" 4096
taskset -c 0 "$WORK/relay-epoll" $((B + 5)) "$B" 2>"$WORK/relay-epoll.log" &
EPOLL_PID=$!
track "$EPOLL_PID"
taskset -c 0 "$WORK/relay-uring" $((B + 6)) "$B" 2>"$WORK/relay-uring.log" &
URING_PID=$!
track "$URING_PID"
wait_http $((B + 5)) "relay-epoll"
wait_http $((B + 6)) "relay-uring"

# user and system ticks of a process tree, as "U S"
ticks() {
    local u=0 s=0 p f
    for p in $(proc_tree "$1"); do
        f=$(cat /proc/"$p"/stat 2>/dev/null) || continue
        f=${f##*) }
        # shellcheck disable=SC2086
        set -- $f
        u=$((u + ${12})) s=$((s + ${13}))
    done
    echo "$u $s"
}

SECS=${FLOOR_SECONDS:-6}
TARGETS="baton:$((B + 2)):$BATON_PID nginx:$((B + 4)):$NGINX_PID epoll-floor:$((B + 5)):$EPOLL_PID uring-floor:$((B + 6)):$URING_PID"
for t in $TARGETS; do
    IFS=: read -r _ port _ <<<"$t"
    timeout 30 taskset -c 1 wrk -t1 -c64 -d1s "http://127.0.0.1:$port/" >/dev/null
done
log "$(("${FLOOR_ROUNDS:-5}" * 4)) runs of ${SECS}s; load average $(load_avg)"
echo "| round | target | req/s | user CPU-s/100k | sys CPU-s/100k | total | p99 |"
echo "|---|---|---:|---:|---:|---:|---:|"
for ((r = 1; r <= ${FLOOR_ROUNDS:-5}; r++)); do
    for t in $TARGETS; do
        IFS=: read -r name port pid <<<"$t"
        [[ -d /proc/$pid ]] || die "$name: its process $pid is gone (logs in $WORK)"
        read -r u0 s0 <<<"$(ticks "$pid")"
        out=$(timeout $((SECS + 30)) taskset -c 1 wrk -t1 -c64 -d"${SECS}s" --latency "http://127.0.0.1:$port/")
        read -r u1 s1 <<<"$(ticks "$pid")"
        req=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        grep -q 'Non-2xx\|Socket errors' <<<"$out" && log "$name round $r: $(grep 'Non-2xx\|Socket errors' <<<"$out")"
        awk -v n="$name" -v q="$req" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v d="$SECS" -v p="$p99" \
            -v rd="$r" -v hz="$CLK_TCK" 'BEGIN {
                k = 1e5 / q / hz
                printf "| %d | %s | %.1fk | %.2f | %.2f | %.2f | %s |\n", rd, n, q / d / 1000, u * k, s * k, (u + s) * k, p
            }'
    done
done
log "load average after: $(load_avg)"
