#!/usr/bin/env bash
# User and system CPU seconds per 100k requests of one running proxy, apart (scripts/bench.sh
# reports only their sum):
#
#   scripts/bench/cpu-split.sh PID URL SECONDS [wrk args...]
#
# PID is the proxy's main process (its children are counted too), URL one of its listeners on
# 127.0.0.1; wrk runs pinned to CPU 1 with -t1 -c64 for SECONDS (bounded), as in bench.sh.
# Prints req/s, p99 and user/sys/total CPU-s per 100k requests.
set -euo pipefail
(($# >= 3)) || { sed -n 2,9p "$0"; exit 2; }
pid=$1 url=$2 secs=$3
shift 3
[[ "$url" == http://127.0.0.1:* || "$url" == https://127.0.0.1:* ]] || { echo "URL must be on 127.0.0.1" >&2; exit 2; }
tree() { local p=$1 c; [[ -d /proc/$p ]] || return 0; echo "$p"; for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do tree "$c"; done; }
ticks() {
    local u=0 s=0 p f
    for p in $(tree "$pid"); do
        f=$(sed 's/.*) //' /proc/"$p"/stat 2>/dev/null) || continue
        # shellcheck disable=SC2086
        set -- $f
        u=$((u + ${12})) s=$((s + ${13}))
    done
    echo "$u $s"
}
[[ -d /proc/$pid ]] || { echo "no process $pid" >&2; exit 1; }
hz=$(getconf CLK_TCK)
read -r u0 s0 < <(ticks)
out=$(taskset -c 1 wrk -t1 -c64 -d"${secs}s" --latency "$@" "$url")
read -r u1 s1 < <(ticks)
req=$(awk '/requests in/ {print $1}' <<<"$out")
rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
p99=$(awk '$1=="99%" {print $2}' <<<"$out")
awk -v r="$req" -v rps="$rps" -v p99="$p99" -v hz="$hz" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) 'BEGIN {
    if (r == 0) { print "no requests"; exit 1 }
    printf "req/s=%.0f p99=%s user=%.2f sys=%.2f total=%.2f (CPU-s per 100k requests)\n",
        rps, p99, du / hz / r * 1e5, ds / hz / r * 1e5, (du + ds) / hz / r * 1e5 }'
