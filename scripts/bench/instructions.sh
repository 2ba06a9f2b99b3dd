#!/usr/bin/env bash
# User-space instructions per request of each proxy, counted by valgrind's callgrind: a figure
# that does not move with the machine's load (unlike req/s or CPU seconds), so it compares the
# proxies' own work even while other jobs compile. Kernel work (syscalls, TCP) is not counted.
#
#   scripts/bench/instructions.sh        Markdown table on stdout
#
# Each proxy runs under `valgrind --tool=callgrind` (nginx as a single process); counters are
# zeroed before and dumped after each `wrk -t1 -c8 -d${INSN_SECONDS:-5}s` run. BENCH_KEEP=1 keeps
# the callgrind files (callgrind_annotate FILE shows where the instructions go).
# INSN_PROXIES="baton" limits the proxies measured (default: baton haproxy nginx).
# Same ports, backend, configs and clean-up as scripts/bench.sh.
set -uo pipefail

# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS="${INSN_SECONDS:-5}"
BASE="${BENCH_PORT_BASE:-18400}"
P_BACKEND=$BASE
command -v valgrind >/dev/null || {
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq valgrind >&2 || die "valgrind missing"
}
bench_start
require_free_ports "$P_BACKEND" $((BASE + 1)) $((BASE + 2))
start_backend "$P_BACKEND" 1

echo "## User-space instructions per request (callgrind, $(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "wrk -t1 -c8 -d${SECS}s through each proxy running under valgrind --tool=callgrind; Ir = instructions"
echo "executed in the proxy's user space (its code and libraries), divided by the requests wrk completed."
echo
echo "| proxy | L4 keep-alive | HTTP keep-alive | L4 new connection | HTTP new connection |"
echo "|---|---:|---:|---:|---:|"

export PROXY_WRAP="valgrind --tool=callgrind --callgrind-out-file=$WORK/cg.%p"
export NGINX_MASTER=off
for proxy in ${INSN_PROXIES:-baton haproxy nginx}; do
    tport=$((BASE + 1)) hport=$((BASE + 2))
    "start_$proxy" 0 "$tport" "$hport" "$P_BACKEND" 512
    case $proxy in baton) pid=$BATON_PID ;; haproxy) pid=$HAPROXY_PID ;; nginx) pid=$NGINX_PID ;; esac
    # taskset exec'd valgrind, so $pid is the valgrind'ed process itself.
    cells=()
    for case in keepalive close; do
        for port in "$tport" "$hport"; do
            hdr=()
            [[ "$case" == close ]] && hdr=(-H 'Connection: close')
            callgrind_control -z "$pid" >/dev/null 2>&1 || die "callgrind_control -z $pid failed"
            out=$(timeout $((SECS + 60)) taskset -c 1 wrk -t1 -c8 -d"${SECS}s" -s "$BENCH_DIR/summary.lua" \
                "${hdr[@]}" "http://127.0.0.1:$port/" 2>&1)
            callgrind_control -d "$pid" >/dev/null 2>&1 || die "callgrind_control -d $pid failed"
            sleep 0.5
            # shellcheck disable=SC2012 # names are ours: cg.PID.N
            f=$(ls -t "$WORK"/cg."$pid".* 2>/dev/null | head -1)
            ir=$(awk '/^totals:/ {print $2}' "$f")
            req=$(grep -o 'requests=[0-9]*' <<<"$out" | cut -d= -f2)
            if [[ -n "$ir" && -n "$req" && "$req" -gt 0 ]]; then
                cells+=("$(awk -v i="$ir" -v r="$req" 'BEGIN {printf "%.1fk Ir (%d req)", i / r / 1000, r}')")
            else
                cells+=("?")
            fi
            log "$proxy $case port $port: ${cells[-1]}"
        done
    done
    echo "| $proxy | ${cells[0]} | ${cells[1]} | ${cells[2]} | ${cells[3]} |"
    stop_pid "$pid"
    rm -f "$WORK/baton.pid"
    [[ "${BENCH_KEEP:-0}" == 1 ]] && log "callgrind files of $proxy: $WORK/cg.$pid.*"
done
