#!/usr/bin/env bash
# Two baton binaries side by side, and nginx for reference, in interleaved rounds: the way to
# see what one change does when the machine's noise between runs is larger than the change.
#
#   scripts/bench/ab.sh OLD_BATON NEW_BATON [close|keepalive]
#
# Each round runs `wrk -t1 -c64 -d${AB_SECONDS:-6}s` against A (OLD), B (NEW) and nginx, and
# prints req/s, proxy CPU-s per 100k requests and p99. AB_ROUNDS rounds (default 5).
set -uo pipefail
(($# >= 2)) || { sed -n 2,8p "$0"; exit 2; }
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"
A_BIN=$(realpath "$1") B_BIN=$(realpath "$2") CASE=${3:-close}
[[ -x "$A_BIN" && -x "$B_BIN" ]] || die "both binaries must exist"
BENCH_NO_BUILD=1 bench_start
B="${BENCH_PORT_BASE:-18700}"
require_free_ports "$B" $((B + 1)) $((B + 2)) $((B + 3)) $((B + 4)) $((B + 5)) $((B + 6))
start_backend "$B" 1
BATON=$A_BIN start_baton 0 $((B + 1)) $((B + 2)) "$B" 4096
PA=$BATON_PID
mv "$WORK/baton" "$WORK/baton-a" # the second baton writes its own config there
BATON=$B_BIN start_baton 0 $((B + 3)) $((B + 4)) "$B" 4096
PB=$BATON_PID
start_nginx 0 $((B + 5)) $((B + 6)) "$B" 4096
hdr=()
[[ $CASE == close ]] && hdr=(-H 'Connection: close')
SECS=${AB_SECONDS:-6}
for port in $((B + 2)) $((B + 4)) $((B + 6)); do
    timeout 30 taskset -c 1 wrk -t1 -c64 -d1s "${hdr[@]}" "http://127.0.0.1:$port/" >/dev/null
done
for ((r = 1; r <= ${AB_ROUNDS:-5}; r++)); do
    for t in A:$((B + 2)):$PA B:$((B + 4)):$PB nginx:$((B + 6)):$NGINX_PID; do
        IFS=: read -r name port pid <<<"$t"
        c0=$(cpu_ticks "$pid")
        out=$(timeout $((SECS + 30)) taskset -c 1 wrk -t1 -c64 -d"${SECS}s" --latency "${hdr[@]}" "http://127.0.0.1:$port/")
        c1=$(cpu_ticks "$pid")
        req=$(awk '/requests in/ {print $1}' <<<"$out")
        p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
        awk -v n="$name" -v r="$req" -v c=$((c1 - c0)) -v s="$SECS" -v p="$p99" -v rd="$r" -v hz="$CLK_TCK" \
            'BEGIN {printf "round %d %-6s req/s=%6.0f cpu-s/100k=%.2f p99=%s\n", rd, n, r / s, c / hz * 1e5 / r, p}'
    done
done
