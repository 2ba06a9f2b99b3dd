#!/usr/bin/env bash
# Live upgrades under load (the benchmark in docs/BENCHMARKS.md), printed as Markdown on stdout.
#
# 1. wrk through baton HTTP for UPGRADE_SECONDS (30) with `baton upgrade` every
#    UPGRADE_EVERY (3) seconds, once with keep-alive and once with `Connection: close`:
#    requests, wrk errors, non-2xx (counted by a wrk Lua `response` callback), upgrades done.
#    Target: 0 errors, 0 non-2xx.
# 2. Handover of HANDOVER_IDLE (10,000) idle keep-alive HTTP connections plus HANDOVER_ACTIVE
#    (1,000) active L4 tunnels (each sending a request every 200 ms): time from the trigger to the
#    old process's exit (watched in /proc), the pause each active tunnel saw (p50/p99 of the
#    longest round trip per tunnel), a check that every idle connection still answers
#    afterwards, and the peak RSS of both processes together against steady state.
#
# Same backend and setup as scripts/bench.sh (nginx `return 200`, 127.0.0.1 only, everything
# stopped by pid at the end). BENCH_NO_BUILD=1 skips the build; BENCH_PORT_BASE (18400) moves
# the ports; BENCH_KEEP=1 keeps the temporary folder.
set -uo pipefail

# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/bench/lib.sh"

SECS="${UPGRADE_SECONDS:-30}"
EVERY="${UPGRADE_EVERY:-3}"
IDLE_N="${HANDOVER_IDLE:-10000}"
ACTIVE_N="${HANDOVER_ACTIVE:-1000}"
BASE="${BENCH_PORT_BASE:-18400}"
P_BACKEND=$BASE P_TCP=$((BASE + 1)) P_HTTP=$((BASE + 2))
LCPU="${BENCH_LOAD_CPU:-1}"

bench_start
require_free_ports "$P_BACKEND" "$P_TCP" "$P_HTTP"

start_backend "$P_BACKEND" "$LCPU"
# baton unpinned with its default thread count (one per core), as an operator would run it.
BATON_THREADS=0 start_baton "" "$P_TCP" "$P_HTTP" "$P_BACKEND" 15000
CFG="$WORK/baton/baton.yaml"
PIDFILE="$WORK/baton.pid"

live_pid() { cat "$PIDFILE" 2>/dev/null; }
# A process that exited but was not reaped yet (our own child) is a zombie: not alive.
alive() { [[ -d /proc/$1 ]] && ! grep -q '^State:.*Z' /proc/"$1"/status 2>/dev/null; }

echo "## Upgrades under load ($(date -u '+%Y-%m-%d %H:%M UTC'), load average $(load_avg))"
echo
echo "wrk -t1 -c64 -d${SECS}s through baton HTTP, \`baton upgrade\` every ${EVERY} s."
echo
echo "| case | requests | wrk errors (connect/read/write/timeout) | non-2xx | upgrades ok / failed | p99 | max latency |"
echo "|---|---:|---|---:|---:|---:|---:|"
for case in keepalive close; do
    hdr=()
    [[ "$case" == close ]] && hdr=(-H 'Connection: close')
    timeout $((SECS + 30)) taskset -c "$LCPU" wrk -t1 -c64 -d"${SECS}s" --latency -s "$BENCH_DIR/count.lua" \
        "${hdr[@]}" "http://127.0.0.1:$P_HTTP/" >"$WORK/wrk-$case.out" 2>&1 &
    wrk_pid=$!
    track "$wrk_pid"
    ok=0 failed=0
    : >"$WORK/upgrades-$case.out"
    sleep "$EVERY"
    while alive "$wrk_pid"; do
        if timeout 60 "$BATON" upgrade -c "$CFG" >>"$WORK/upgrades-$case.out" 2>&1; then
            ok=$((ok + 1))
        else
            failed=$((failed + 1))
            log "upgrade failed: $(tail -1 "$WORK/upgrades-$case.out")"
        fi
        for ((i = 0; i < EVERY * 10; i++)); do alive "$wrk_pid" || break; sleep 0.1; done
    done
    wait "$wrk_pid" 2>/dev/null
    line=$(grep '^UPGRADE ' "$WORK/wrk-$case.out" | head -1)
    [[ -n "$line" ]] || { cat "$WORK/wrk-$case.out" >&2; die "wrk gave no summary"; }
    # shellcheck disable=SC2046
    declare $(tr ' ' '\n' <<<"${line#UPGRADE }" | grep -E '^[a-z0-9_]+=[0-9]+$')
    # shellcheck disable=SC2154
    printf '| %s | %d | %d/%d/%d/%d | %d | %d / %d | %.2f ms | %.1f ms |\n' "$case" "$requests" \
        "$connect" "$read" "$write" "$timeout" "$non2xx" "$ok" "$failed" \
        "$(awk -v v="$p99_us" 'BEGIN {print v / 1000}')" "$(awk -v v="$max_us" 'BEGIN {print v / 1000}')"
done
echo
echo "Last upgrade summary (keep-alive case): \`$(tail -1 "$WORK/upgrades-keepalive.out")\`"
echo

# --- handover of many connections ---
old=$(live_pid)
ready="$WORK/ready"
taskset -c "$LCPU" python3 "$BENCH_DIR/conns.py" --idle "127.0.0.1:$P_HTTP" "$IDLE_N" \
    --active "127.0.0.1:$P_TCP" "$ACTIVE_N" --interval-ms 200 --ready-file "$ready" \
    --max-seconds 300 >"$WORK/conns.out" 2>&1 &
cpid=$!
track "$cpid"
for ((i = 0; i < 1200; i++)); do
    [[ -s "$ready" ]] || ! alive "$cpid" && break
    sleep 0.1
done
[[ -s "$ready" ]] || { cat "$WORK/conns.out" >&2; die "clients not established in 120 s"; }
# Steady state: the highest RSS seen over 2 s.
steady=0
for ((i = 0; i < 20; i++)); do
    r=$(rss_kib "$old")
    ((r > steady)) && steady=$r
    sleep 0.1
done
t0=$(date +%s%N)
timeout 120 "$BATON" upgrade -c "$CFG" >"$WORK/handover-upgrade.out" 2>&1 &
upid=$!
track "$upid"
peak=0 new=""
while alive "$old"; do
    [[ -z "$new" ]] && new=$(cat /proc/"$old"/task/*/children 2>/dev/null | tr ' ' '\n' | grep -m1 .)
    r=$(($(rss_kib "$old") + ${new:+$(rss_kib "$new")}+0))
    ((r > peak)) && peak=$r
    (($(date +%s%N) - t0 > 120000000000)) && die "old process $old still alive 120 s after the trigger"
    sleep 0.005
done
t1=$(date +%s%N)
wait "$upid"
urc=$?
new=$(live_pid)
sleep 2
after=$(rss_kib "$new")
kill -USR1 "$cpid" 2>/dev/null
wait "$cpid"
crc=$?
summary=$(tail -1 "$WORK/conns.out")
echo "### Handover of $IDLE_N idle keep-alive connections + $ACTIVE_N active tunnels"
echo
echo "- trigger → old process ($old) exit: **$(((t1 - t0) / 1000000)) ms** (\`baton upgrade\` exit $urc: \`$(tail -1 "$WORK/handover-upgrade.out")\`)"
echo "- RSS: steady state $((steady / 1024)) MiB (old process); peak during the upgrade, both processes: $((peak / 1024)) MiB; new process 2 s after: $((after / 1024)) MiB"
python3 - "$summary" <<'EOF'
import json, sys
d = json.loads(sys.argv[1])
print(f"- idle connections answering on the new process afterwards: {d['idle_verified_ok']} / {d['idle']}")
print(f"- active tunnels: {d['active_requests']} requests, round trip p50 {d['rtt_p50_ms']} ms, p99 {d['rtt_p99_ms']} ms;"
      f" longest round trip per tunnel (the pause): p50 {d['tunnel_max_rtt_p50_ms']} ms, p99 {d['tunnel_max_rtt_p99_ms']} ms,"
      f" max {d['tunnel_max_rtt_max_ms']} ms")
print(f"- client errors: {d['errors']}, non-2xx: {d['non2xx']}" + (f" (e.g. {d['error_samples'][0]})" if d['error_samples'] else ""))
EOF
echo
exit $(((urc != 0 || crc != 0) ? 1 : 0))
