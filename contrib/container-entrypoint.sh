#!/bin/sh
# Container entrypoint that survives baton's in-place upgrades. baton's pid changes on every
# upgrade and the old process exits; if baton were the container's main process, that exit
# would end the container. This script stays the main process (under tini, which reaps the
# old generations), forwards signals to whichever pid serves now (runtime.pid_file), and
# exits when no generation is left.
set -eu
PIDFILE=${BATON_PID_FILE:-/run/baton/baton.pid}
/usr/local/bin/baton "$@" &
first=$!
current() { cat "$PIDFILE" 2>/dev/null || echo "$first"; }
fwd() { kill -"$1" "$(current)" 2>/dev/null || true; }
trap 'fwd TERM' TERM
trap 'fwd INT' INT
trap 'fwd HUP' HUP
trap 'fwd USR1' USR1
trap 'fwd USR2' USR2
while kill -0 "$(current)" 2>/dev/null || kill -0 "$first" 2>/dev/null; do
    sleep 1 &
    wait $! || true
done
