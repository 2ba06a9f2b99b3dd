#!/usr/bin/env bash
# Multi-process mode (docs/multiprocess.md): throughput of N=2 workers (accept: shared, reuseport) against
# one process with 2 threads, L4 and HTTP, keep-alive, with wrk on 127.0.0.1; then the time from
# a worker's kill -9 to its replacement serving. Nothing is pinned (two workers need both CPUs;
# wrk and the nginx backend share them). Reuses scripts/bench/lib.sh; everything started is
# stopped by pid on exit.
#
#   BENCH_SECONDS=5 BENCH_ROUNDS=2 BENCH_CONNS=64 BENCH_KILLS=5 BENCH_PORT_BASE=18500
#   BENCH_NO_BUILD=1  use target/release/baton as it is
set -euo pipefail
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"

SECS=${BENCH_SECONDS:-5}
ROUNDS=${BENCH_ROUNDS:-2}
CONNS=${BENCH_CONNS:-64}
KILLS=${BENCH_KILLS:-5}
BASE=${BENCH_PORT_BASE:-18500}
MODES="single shared reuseport"

bench_start
for p in $(seq "$BASE" $((BASE + 6))); do port_free "$p" || die "port $p is in use"; done
start_backend "$BASE" 0,1

# start_mode MODE INDEX: baton with an L4 and an HTTP listener; sets PID_<MODE>.
start_mode() {
    local mode=$1 i=$2 d="$WORK/$1" tport=$((BASE + 1 + 2 * $2)) hport=$((BASE + 2 + 2 * $2)) rt
    mkdir -p "$d"
    case $mode in
    single) rt="  worker_threads: 2" ;;
    *) rt="  workers: 2
  accept: $mode
  worker_threads: 1" ;;
    esac
    cat >"$d/baton.yaml" <<EOF
runtime:
  pid_file: $d/baton.pid
  control_socket: $d/baton.sock
  drain_timeout: 2s
$rt
log:
  level: info
  file: $d/baton.log
listeners:
  l4: { listen: "127.0.0.1:$tport", protocol: tcp, upstream: backend, backlog: 4096 }
  web: { listen: "127.0.0.1:$hport", protocol: http, upstream: backend, backlog: 4096 }
upstreams:
  backend:
    servers: [127.0.0.1:$BASE]
    retries: 0
    http: { pool_idle_per_server: 128 }
EOF
    "$BATON" run -c "$d/baton.yaml" >"$d/stderr" 2>&1 &
    track $!
    eval "PORT_${mode}_tcp=$tport PORT_${mode}_http=$hport"
    wait_http "$hport" "baton $mode http"
    wait_http "$tport" "baton $mode tcp"
}

i=0
for m in $MODES; do start_mode "$m" "$i"; i=$((i + 1)); done
load_before=$(load_avg)
declare -A RPS
for ((round = 1; round <= ROUNDS; round++)); do
    for proto in tcp http; do
        for m in $MODES; do
            var="PORT_${m}_${proto}"
            out=$(timeout $((SECS + 30)) wrk -t2 -c"$CONNS" -d"${SECS}s" "http://127.0.0.1:${!var}/" 2>&1)
            rps=$(awk '/^Requests\/sec/ {print $2}' <<<"$out")
            errs=$(awk '/Non-2xx|Socket errors/' <<<"$out" | tr '\n' ' ')
            log "round $round $m $proto: $rps req/s ${errs}"
            RPS[$m,$proto]+="$rps "
        done
    done
done
load_after=$(load_avg)

median() { tr ' ' '\n' | grep . | sort -n | awk '{a[NR]=$1} END {if (NR%2) print a[(NR+1)/2]; else printf "%.0f\n", (a[NR/2]+a[NR/2+1])/2}'; }
echo "wrk -t2 -c$CONNS -d${SECS}s, keep-alive, $ROUNDS interleaved rounds (median; runs in brackets)."
echo "Load average before: $load_before, after: $load_after. $(nproc) CPUs, kernel $(uname -r)."
echo
echo "| mode | L4 req/s | HTTP req/s |"
echo "|---|---:|---:|"
for m in $MODES; do
    echo "| $m | $(median <<<"${RPS[$m,tcp]}") (${RPS[$m,tcp]% }) | $(median <<<"${RPS[$m,http]}") (${RPS[$m,http]% }) |"
done
echo

# Crash to serving: kill -9 worker 0 of the shared-mode supervisor; time until the log has its
# replacement's "worker started" line (polled every 5 ms).
log_file="$WORK/shared/baton.log"
sock_cfg="$WORK/shared/baton.yaml"
times=()
for ((k = 1; k <= KILLS; k++)); do
    wpid=$("$BATON" status --json -c "$sock_cfg" | python3 -c 'import json,sys; print(json.load(sys.stdin)["workers"][0]["pid"])')
    before=$(grep -c "worker started" "$log_file" || true)
    t0=$(date +%s%N)
    kill -KILL "$wpid"
    for ((n = 0; n < 2000; n++)); do
        (($(grep -c "worker started" "$log_file" || true) > before)) && break
        sleep 0.005
    done
    t1=$(date +%s%N)
    times+=("$(((t1 - t0) / 1000000))")
    # Let the replacement serve and heartbeat before the next kill.
    sleep 1.5
done
echo "kill -9 of a worker to its replacement's \"worker started\" (ms, $KILLS kills): ${times[*]}"
