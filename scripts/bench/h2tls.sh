#!/usr/bin/env bash
# HTTP/2 over TLS (ALPN h2) through baton, HAProxy and nginx, each offering h2 and http/1.1
# with the same certificate (ECDSA P-256, TLS 1.3, AES-128-GCM), in interleaved rounds:
#
#   scripts/bench/h2tls.sh        Markdown table on stdout
#
# Each round runs `h2load -c16 -m10 -D${H2_SECONDS:-6}` (16 connections, 10 streams each) against
# each proxy; the upstream is the usual nginx backend over HTTP/1.1 keep-alive. H2_ROUNDS
# rounds (default 3), medians of req/s and of proxy CPU-s per 100k requests. Proxies pinned to
# CPU 0, h2load and the backend to CPU 1, as in scripts/bench.sh.
set -uo pipefail
# shellcheck source=scripts/bench/lib.sh
source "$(dirname "$0")/lib.sh"
command -v h2load >/dev/null || {
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nghttp2-client >&2 || die "h2load missing"
}
export BENCH_H2=1
bench_start
B="${BENCH_PORT_BASE:-18600}"
SECS=${H2_SECONDS:-6} ROUNDS=${H2_ROUNDS:-3}
require_free_ports "$B" $((B + 1)) $((B + 2)) $((B + 3)) $((B + 4)) $((B + 5)) $((B + 6)) \
    $((B + 7)) $((B + 8)) $((B + 9))
make_cert
start_backend "$B" 1
TLS_PORT_BATON=$((B + 7)) start_baton 0 $((B + 1)) $((B + 2)) "$B" 4096
TLS_PORT_HAPROXY=$((B + 8)) start_haproxy 0 $((B + 3)) $((B + 4)) "$B" 4096
TLS_PORT_NGINX=$((B + 9)) start_nginx 0 $((B + 5)) $((B + 6)) "$B" 4096
declare -A PID=([baton]=$BATON_PID [haproxy]=$HAPROXY_PID [nginx]=$NGINX_PID)
declare -A PORT=([baton]=$((B + 7)) [haproxy]=$((B + 8)) [nginx]=$((B + 9)))
declare -A RPS CPU
for p in baton haproxy nginx; do
    timeout 30 taskset -c 1 h2load -c16 -m10 -D1 "https://127.0.0.1:${PORT[$p]}/" >/dev/null 2>&1
done
for ((r = 1; r <= ROUNDS; r++)); do
    for p in baton haproxy nginx; do
        c0=$(cpu_ticks "${PID[$p]}")
        out=$(timeout $((SECS + 30)) taskset -c 1 h2load -c16 -m10 -D"$SECS" "https://127.0.0.1:${PORT[$p]}/" 2>&1)
        c1=$(cpu_ticks "${PID[$p]}")
        # "requests: N total, N started, N done, N succeeded, N failed, N errored, N timeout"
        succeeded=$(awk '/^requests:/ {print $8}' <<<"$out")
        failed=$(awk '/^requests:/ {print $10}' <<<"$out")
        proto=$(awk '/Application protocol:/ {print $3}' <<<"$out")
        [[ "$proto" == h2 ]] || die "$p did not negotiate h2 (h2load: ${proto:-no protocol}): $out"
        rps=$(awk -v n="${succeeded:-0}" -v s="$SECS" 'BEGIN {printf "%.0f", n / s}')
        cpu=$(awk -v c=$((c1 - c0)) -v n="${succeeded:-0}" -v hz="$CLK_TCK" \
            'BEGIN {printf "%.2f", n ? c / hz / n * 100000 : 0}')
        log "round $r $p: $rps req/s, $cpu CPU-s/100k, failed ${failed:-?}"
        RPS[$p]+="$rps " CPU[$p]+="$cpu "
    done
done
median() { tr ' ' '\n' | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}'; }
echo "## HTTP/2 over TLS ($(date -u '+%Y-%m-%d %H:%M UTC'))"
echo
echo "h2load -c16 -m10 -D${SECS}, $ROUNDS interleaved rounds, medians; proxies pinned to CPU 0, h2load"
echo "and the backend on CPU 1; TLS 1.3 AES-128-GCM, ECDSA P-256; upstream HTTP/1.1 keep-alive."
echo
echo "| proxy | req/s | proxy CPU-s / 100k req | rounds (req/s) |"
echo "|---|---:|---:|---|"
for p in baton haproxy nginx; do
    echo "| $p | $(median <<<"${RPS[$p]}") | $(median <<<"${CPU[$p]}") | ${RPS[$p]}|"
done
