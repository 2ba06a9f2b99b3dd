#!/usr/bin/env bash
# The demo: two backends, baton in front of them (config.yaml), HTTP clients and long-lived
# TCP tunnels busy through it, three live upgrades under that load, and what the clients saw.
#
# Ports: by default every program asks the OS for a free port (port 0) and the demo reads the
# ports back, so nothing can be taken in the meantime and two demos can run side by side.
# BATON_DEMO_PORT_BASE=N uses the fixed ports N (HTTP), N+1 (TCP tunnels), N+2 and N+3
# (backends a and b), N+4 and N+5 (their TCP echo servers) instead, checked after the build.
# BATON_DEMO_PROFILE=debug builds and runs the debug build (quicker to build) instead of release.
#
# Everything runs in a fresh folder (config, pid file, control socket, logs); everything
# started here is stopped by pid at the end. On a failure the demo says what failed and shows
# the end of the log that says why.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORK=$(mktemp -d "${TMPDIR:-/tmp}/baton-demo.XXXXXX")
PIDS=()
LOGS=()

# A pid is signalled only while it is still ours: a child of this shell, or (for the pid file)
# a process whose command line names this run's config. A pid that exited may already belong
# to another program.
our_child() { [[ $(ps -o ppid= -p "$1" 2>/dev/null | tr -d ' ') == "$$" ]]; }
runs_our_config() {
    [[ $1 =~ ^[0-9]+$ && -n ${CONFIG:-} ]] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "$CONFIG"
}
cleanup() {
    for p in "${PIDS[@]}"; do our_child "$p" && kill "$p" 2>/dev/null; done
    # The serving baton is a successor after an upgrade: stop it by the pid it wrote.
    if [[ -f $WORK/baton.pid ]]; then
        p=$(cat "$WORK/baton.pid" 2>/dev/null)
        runs_our_config "$p" && kill "$p" 2>/dev/null
    fi
    return 0
}
trap cleanup EXIT

# Prints why the demo failed, then the end of each log worth reading, and exits 1.
fail() {
    echo "RESULT: FAIL — $1" >&2
    for log in "${LOGS[@]}"; do
        if [[ -s $log ]]; then
            echo "---- last lines of $log" >&2
            tail -n 15 "$log" >&2
        fi
    done
    echo "(all logs in $WORK)" >&2
    exit 1
}

# Waits (up to 30 s) until file $1 has a line matching $2 while process $3 lives; prints it.
wait_line() {
    local file=$1 pattern=$2 pid=$3
    for _ in $(seq 300); do
        if grep -m1 -E "$pattern" "$file" 2>/dev/null; then return 0; fi
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

case ${BATON_DEMO_PROFILE:-release} in
    release) PROFILE_ARGS=(--release); OUT=$ROOT/target/release ;;
    debug) PROFILE_ARGS=(); OUT=$ROOT/target/debug ;;
    *) echo "BATON_DEMO_PROFILE must be release or debug" >&2; exit 2 ;;
esac

if [[ -n ${BATON_DEMO_PORT_BASE:-} ]]; then
    if ! [[ $BATON_DEMO_PORT_BASE =~ ^[0-9]+$ ]] || ((BATON_DEMO_PORT_BASE < 1024 || BATON_DEMO_PORT_BASE > 65530)); then
        echo "BATON_DEMO_PORT_BASE must be a number from 1024 to 65530 (it uses 6 ports from there)" >&2
        exit 2
    fi
    B=$BATON_DEMO_PORT_BASE
    PORTS=("$B" $((B + 1)) $((B + 2)) $((B + 3)) $((B + 4)) $((B + 5)))
else
    PORTS=(0 0 0 0 0 0)
fi

echo "== building baton and the demo programs (${BATON_DEMO_PROFILE:-release}; the first build takes minutes)"
LOGS=("$WORK/build.log")
# cargo's own progress lines, also kept in the log; another demo building at the same time
# shows as "Blocking waiting for file lock". Two builds: building examples turns on baton's
# dev-dependencies, and with them its test hooks (docs/operations.md), which the baton binary
# must not have.
build() {
    cargo build "${PROFILE_ARGS[@]}" --locked "$@" 2>&1 | tee -a "$WORK/build.log" |
        { grep --line-buffered -E '^ *(Compiling|Finished|Blocking|error)' || true; }
}
build --bin baton || fail "the build of baton failed"
build --example backend --example loadgen || fail "the build of the demo programs failed"
BATON=$OUT/baton
EX=$OUT/examples

# Fixed ports are checked now, after the build, so what is reported is still true.
for port in "${PORTS[@]}"; do
    if [[ $port != 0 ]] && (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        fail "port $port on 127.0.0.1 is in use: stop what uses it, choose another BATON_DEMO_PORT_BASE, or unset it for free ports"
    fi
done

echo "== starting backends a and b"
LOGS=("$WORK/a.log" "$WORK/b.log")
"$EX/backend" --listen "127.0.0.1:${PORTS[2]}" --name a --echo "127.0.0.1:${PORTS[4]}" 2>"$WORK/a.log" & A=$!
"$EX/backend" --listen "127.0.0.1:${PORTS[3]}" --name b --echo "127.0.0.1:${PORTS[5]}" 2>"$WORK/b.log" & B=$!
PIDS+=("$A" "$B")
addr_of() { sed -E 's/.* on ([0-9.]+:[0-9]+).*/\1/'; }
A_HTTP=$(wait_line "$WORK/a.log" 'listening on' "$A" | addr_of) || fail "backend a did not start"
A_ECHO=$(wait_line "$WORK/a.log" 'echoing on' "$A" | addr_of) || fail "backend a did not start its echo server"
B_HTTP=$(wait_line "$WORK/b.log" 'listening on' "$B" | addr_of) || fail "backend b did not start"
B_ECHO=$(wait_line "$WORK/b.log" 'echoing on' "$B" | addr_of) || fail "backend b did not start its echo server"
echo "backend a: http $A_HTTP, echo $A_ECHO; backend b: http $B_HTTP, echo $B_ECHO"

# config.yaml with this run's addresses, and its pid file and control socket in $WORK.
CONFIG=$WORK/config.yaml
SOCK=$WORK/baton.sock
sed -E \
    -e "s#127\.0\.0\.1:18080\b#127.0.0.1:${PORTS[0]}#" \
    -e "s#127\.0\.0\.1:15000\b#127.0.0.1:${PORTS[1]}#" \
    -e "s#127\.0\.0\.1:9101\b#$A_HTTP#g" \
    -e "s#127\.0\.0\.1:9102\b#$B_HTTP#g" \
    -e "s#127\.0\.0\.1:9201\b#$A_ECHO#g" \
    -e "s#127\.0\.0\.1:9202\b#$B_ECHO#g" \
    -e "s#pid_file: baton\.pid#pid_file: $WORK/baton.pid#" \
    -e "s#control_socket: baton\.sock#control_socket: $SOCK#" \
    config.yaml >"$CONFIG"

echo "== checking and starting baton with config.yaml (as $CONFIG)"
LOGS=("$WORK/baton.log")
"$BATON" check -c "$CONFIG" || fail "baton check refused the config"
"$BATON" run -c "$CONFIG" 2>"$WORK/baton.log" & FIRST=$!
PIDS+=("$FIRST")
ready=0
for _ in $(seq 300); do
    if "$BATON" status --socket "$SOCK" >/dev/null 2>&1; then ready=1; break; fi
    kill -0 "$FIRST" 2>/dev/null || break
    sleep 0.1
done
[[ $ready == 1 ]] || fail "baton did not start"
"$BATON" status --socket "$SOCK"
listener_addr() { "$BATON" status --socket "$SOCK" | sed -nE "s/^listener $1: [a-z]+ ([0-9.]+:[0-9]+) .*/\1/p"; }
WEB=$(listener_addr web)
ECHO=$(listener_addr echo)
[[ -n $WEB && -n $ECHO ]] || fail "cannot read the listeners' addresses from baton status"

echo "== one request each way (http://$WEB)"
get() {
    printf 'GET %s HTTP/1.1\r\nHost: demo\r\nConnection: close\r\n\r\n' "$1" |
        timeout 5 bash -c "exec 3<>/dev/tcp/${WEB%:*}/${WEB#*:}; cat >&3; cat <&3" | tail -1
}
get / || fail "GET / through baton failed"
get /b || fail "GET /b through baton failed"

echo "== load: 16 keep-alive HTTP clients, 4 clients with a new connection per request, 20 TCP tunnels (14 s)"
LOGS=("$WORK/baton.log" "$WORK/load1.err" "$WORK/load2.err")
"$EX/loadgen" --http "$WEB" --conns 16 --tunnels "$ECHO" --tunnel-conns 20 --seconds 14 \
    >"$WORK/load1.txt" 2>"$WORK/load1.err" & L1=$!
"$EX/loadgen" --http "$WEB" --conns 4 --close --seconds 14 \
    >"$WORK/load2.txt" 2>"$WORK/load2.err" & L2=$!
PIDS+=("$L1" "$L2")
sleep 2
upgrades=0
for i in 1 2 3; do
    echo "-- upgrade $i (old pid $(cat "$WORK/baton.pid"))"
    if "$BATON" upgrade --socket "$SOCK"; then upgrades=$((upgrades + 1)); fi
    sleep 3
done
status=0
wait "$L1" || status=1
wait "$L2" || status=1

echo "== what the clients saw"
echo "keep-alive + tunnels: $(cat "$WORK/load1.txt")"
echo "connection per request: $(cat "$WORK/load2.txt")"
if [[ -s $WORK/load1.err || -s $WORK/load2.err ]]; then
    echo "client errors:"; head -5 "$WORK/load1.err" "$WORK/load2.err"
fi
echo "== baton now"
"$BATON" status --socket "$SOCK"
"$BATON" stop --socket "$SOCK"
if [[ $upgrades != 3 ]]; then
    fail "only $upgrades of 3 upgrades succeeded"
fi
if [[ $status != 0 ]]; then
    fail "a client saw an error"
fi
echo "RESULT: PASS — three live upgrades under load, no client noticed (logs: $WORK)"
