#!/usr/bin/env bash
# TCP segments per request through baton, HAProxy and nginx (HTTP), keep-alive and
# `Connection: close`: deltas of /proc/net/snmp (Tcp OutSegs) and /proc/net/netstat (TcpExt
# TCPPureAcks, DelayedACKs) around a `wrk -t1 -c64 -d3s` run, divided by the requests wrk
# completed. The counters are system-wide: run it on a quiet machine.
#
#   scripts/bench/segments.sh            (BENCH_NO_BUILD=1 to use the existing release build)
set -uo pipefail
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"
bench_start
B="${BENCH_PORT_BASE:-18600}"
require_free_ports "$B" $((B + 1)) $((B + 2)) $((B + 3)) $((B + 4)) $((B + 5)) $((B + 6))
start_backend "$B" 1
start_baton 0 $((B + 1)) $((B + 2)) "$B" 4096
start_haproxy 0 $((B + 3)) $((B + 4)) "$B" 4096
start_nginx 0 $((B + 5)) $((B + 6)) "$B" 4096
# OutSegs, then the TcpExt counters named below, one per line.
counters() {
    awk '/^Tcp: [0-9]/ {print $12}' /proc/net/snmp
    awk 'NR == 1 {for (i = 2; i <= NF; i++) n[i] = $i}
         NR == 2 {for (i = 2; i <= NF; i++) if (n[i] == "TCPPureAcks" || n[i] == "DelayedACKs") print $i}' /proc/net/netstat
}
echo "| proxy | case | requests | segments / request | pure ACKs received / request | delayed ACKs / request |"
echo "|---|---|---:|---:|---:|---:|"
for case in keepalive close; do
    hdr=()
    [[ $case == close ]] && hdr=(-H 'Connection: close')
    for t in baton:$((B + 2)) haproxy:$((B + 4)) nginx:$((B + 6)); do
        name=${t%%:*} port=${t##*:}
        mapfile -t c0 < <(counters)
        out=$(timeout 30 taskset -c 1 wrk -t1 -c64 -d3s "${hdr[@]}" "http://127.0.0.1:$port/")
        mapfile -t c1 < <(counters)
        req=$(awk '/requests in/ {print $1}' <<<"$out")
        awk -v n="$name" -v c="$case" -v r="$req" -v s=$((c1[0] - c0[0])) -v d=$((c1[1] - c0[1])) \
            -v p=$((c1[2] - c0[2])) 'BEGIN {printf "| %s | %s | %d | %.2f | %.2f | %.2f |\n", n, c, r, s / r, p / r, d / r}'
    done
done
