#!/usr/bin/env bash
# Instructions and allocations per call of the head code (benches/head.rs), counted by valgrind
# so the figures do not move with the machine's load: each case runs N and 0 times in its own
# process, and the difference is divided by N.
#   scripts/bench/head.sh [BENCH_BINARY]   (default: builds `cargo bench --bench head --no-run`
#   with thin settings: CARGO_PROFILE_BENCH_LTO=false CARGO_PROFILE_BENCH_CODEGEN_UNITS=16)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${1:-}
if [[ -z $bin ]]; then
    export CARGO_PROFILE_BENCH_LTO=${CARGO_PROFILE_BENCH_LTO:-false}
    export CARGO_PROFILE_BENCH_CODEGEN_UNITS=${CARGO_PROFILE_BENCH_CODEGEN_UNITS:-16}
    bin=$(cargo bench --bench head --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for l in sys.stdin:
    m=json.loads(l)
    if m.get("reason")=="compiler-artifact" and m["target"]["name"]=="head" and m.get("executable"): print(m["executable"])' | tail -1)
fi
n=${HEAD_BENCH_N:-2000}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
insns() { # iterations case
    HEAD_BENCH_ITERS=$1 HEAD_BENCH_CASE=$2 valgrind --tool=callgrind --callgrind-out-file="$tmp/cg" "$bin" >/dev/null 2>&1
    awk '/^summary:/ {print $2}' "$tmp/cg"
}
allocs() { # iterations case
    HEAD_BENCH_ITERS=$1 HEAD_BENCH_CASE=$2 valgrind --tool=memcheck "$bin" 2>&1 >/dev/null |
        sed -n 's/.*total heap usage: \([0-9,]*\) allocs.*/\1/p' | tr -d ,
}
printf '%-26s %12s %10s\n' case instructions allocs
for c in parse_request/wrk parse_request/browser parse_response/nginx parse_response_into/nginx assemble/wrk; do
    i=$(( ($(insns "$n" "$c") - $(insns 0 "$c")) / n ))
    a=$(echo "scale=2; ($(allocs "$n" "$c") - $(allocs 0 "$c")) / $n" | bc)
    printf '%-26s %12s %10s\n' "$c" "$i" "$a"
done
